#![no_main]
//! cargo-fuzz target; the logic lives in `tandem_fuzz::lock_wal`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_fuzz::lock_wal(data));
