#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| covey::fuzz::sync_message(data));
