/*
 * Runtime for setjmp/longjmp lowered to WebAssembly exceptions (LLVM's
 * -wasm-enable-sjlj with the standard, non-legacy EH encoding).
 *
 * The compiler rewrites setjmp(env) into __wasm_setjmp(env, label, id),
 * where `id` identifies the calling function's activation and `label` the
 * setjmp site. longjmp(env, val) becomes __wasm_longjmp(env, val), which
 * throws the `__c_longjmp` tag with a pointer to {env, val}; each function
 * that called setjmp catches it and asks __wasm_setjmp_test whether the
 * env belongs to its activation (returning the label to resume at) or not
 * (0: rethrow).
 */
#include <stdint.h>

struct covey_longjmp_args {
    void *env;
    int val;
};

/* Lives in the first words of the jmp_buf (which is far larger). */
struct covey_jmp_state {
    void *activation;
    uint32_t label;
    struct covey_longjmp_args args;
};

/* The exception tag the compiler refers to: one i32 (a pointer) payload. */
__asm__(".globl __c_longjmp\n"
        ".tagtype __c_longjmp i32\n"
        "__c_longjmp:\n");

void __wasm_setjmp(void *env, uint32_t label, void *activation) {
    struct covey_jmp_state *s = env;
    s->activation = activation;
    s->label = label;
}

uint32_t __wasm_setjmp_test(void *env, void *activation) {
    struct covey_jmp_state *s = env;
    return s->activation == activation ? s->label : 0;
}

void __wasm_longjmp(void *env, int val) {
    struct covey_jmp_state *s = env;
    s->args.env = env;
    /* longjmp(env, 0) makes setjmp return 1 (C11 7.13.2.1). */
    s->args.val = val != 0 ? val : 1;
    __builtin_wasm_throw(1, &s->args);
}
