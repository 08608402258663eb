#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| covey::fuzz::device_frame(data));
