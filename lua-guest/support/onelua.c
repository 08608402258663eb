/*
 * Lua 5.4 as one translation unit (the sources are lua-src's, found by
 * build.sh; see build.rs), the way Lua's own `onelua.c` builds it.
 *
 * Why: in WebAssembly a call between C functions is dear. Each callee
 * checks the engine's epoch and the stack limit on entry and saves its
 * callee-saved registers (the engine cannot elide that as a native
 * compiler does), so the small cross-file calls of the Lua core, cheap
 * natively, are a visible share of an interpreted program. In one unit
 * clang sees the whole core and inlines across files; two hints go further:
 *
 * - the C API (lapi.c) is inlined into the libraries that call it in their
 *   inner loops: `table.sort` calls lua_geti/lua_seti/lua_compare per
 *   element (table-sort 0.67x -> 0.94x native lua5.4 in the CPU bench);
 * - luaD_precall, the call sequence of every Lua function call, is inlined
 *   into the interpreter's OP_CALL.
 *
 * A bigger inline threshold everywhere (-mllvm -inline-threshold=600) was
 * measured and not kept: it also inlined the debug hooks into the
 * interpreter loop, which doubled in size and ran fib ~10 % slower.
 * See docs/benchmarks.md ("Lua CPU-bound").
 */

/* ltablib.c declares arc4random through <stdlib.h> included before
 * lprefix.h's feature macros, which hide it; so include it first. */
#include <stdlib.h>
#include "lprefix.h"

/* core */
#include "lzio.c"
#include "lctype.c"
#include "lopcodes.c"
#include "lmem.c"
#include "lundump.c"
#include "ldump.c"
#include "lstate.c"
#include "lgc.c"
#include "llex.c"
#include "lcode.c"
#include "lparser.c"
#include "ldebug.c"
#include "lfunc.c"
#include "lobject.c"
#include "ltm.c"
#include "lstring.c"
#include "ltable.c"
CallInfo *luaD_precall(lua_State *L, StkId func, int nResults)
    __attribute__((always_inline));
#include "ldo.c"
#include "lvm.c"
#pragma clang attribute push(__attribute__((always_inline)), apply_to = function)
#include "lapi.c"
#pragma clang attribute pop

/* libraries */
#include "lauxlib.c"
#include "lbaselib.c"
#include "lcorolib.c"
#include "ldblib.c"
#include "liolib.c"
#include "lmathlib.c"
#include "loadlib.c"
#include "loslib.c"
#include "lstrlib.c"
#include "ltablib.c"
#include "lutf8lib.c"
#include "linit.c"
