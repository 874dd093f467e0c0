//! libFuzzer target: see `api_key_server_fuzz::validate_body`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| api_key_server_fuzz::validate_body(data));
