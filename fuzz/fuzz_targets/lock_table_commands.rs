#![no_main]
//! cargo-fuzz target; the logic lives in `tandem_fuzz::lock_table_commands`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_fuzz::lock_table_commands(data));
