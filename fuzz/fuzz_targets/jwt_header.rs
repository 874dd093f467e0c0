//! libFuzzer target: see `api_key_server_fuzz::jwt_header`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| api_key_server_fuzz::jwt_header(data));
