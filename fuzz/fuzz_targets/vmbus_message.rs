#![no_main]
//! libFuzzer entry of `vmbus_message`; the target and its invariants are in
//! `tidevm_fuzz::targets::hyperv::vmbus_message`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidevm_fuzz::targets::hyperv::vmbus_message::run(data));
