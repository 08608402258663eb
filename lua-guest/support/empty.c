/*
 * lua-src asks the linker for -lwasi-emulated-signal; the Lua library
 * itself needs nothing from it (only the standalone `lua` program installs
 * signal handlers), so an empty archive satisfies the request.
 */
typedef int covey_empty_translation_unit;
