#![no_main]
//! libFuzzer entry of `dm_message`; the target and its invariants are in
//! `tidevm_fuzz::targets::hyperv::dm_message`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidevm_fuzz::targets::hyperv::dm_message::run(data));
