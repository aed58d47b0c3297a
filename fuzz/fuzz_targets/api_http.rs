#![no_main]
//! libFuzzer entry of `api_http`; the target and its invariants are in
//! `tidevm_fuzz::targets::api_http`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidevm_fuzz::targets::api_http::run(data));
