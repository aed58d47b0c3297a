#![no_main]
//! libFuzzer entry of `blk_request`; the target and its invariants are in
//! `tidevm_fuzz::targets::blk_request`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidevm_fuzz::targets::blk_request::run(data));
