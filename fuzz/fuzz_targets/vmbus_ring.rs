#![no_main]
//! libFuzzer entry of `vmbus_ring`; the target and its invariants are in
//! `tidevm_fuzz::targets::hyperv::vmbus_ring`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidevm_fuzz::targets::hyperv::vmbus_ring::run(data));
