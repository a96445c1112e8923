#![no_main]
//! cargo-fuzz target; the logic lives in `tandem_fuzz::fs_journal_replay`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_fuzz::fs_journal_replay(data));
