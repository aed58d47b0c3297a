#![no_main]
//! libFuzzer entry of `blk_queue`; the target and its invariants are in
//! `tidevm_fuzz::targets::blk_queue`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidevm_fuzz::targets::blk_queue::run(data));
