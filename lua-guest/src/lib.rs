//! Lua 5.4 guest (placeholder; see README.md).
