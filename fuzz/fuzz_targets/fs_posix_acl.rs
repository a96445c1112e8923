#![no_main]
//! cargo-fuzz target; the logic lives in `tandem_fuzz::fs_posix_acl`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_fuzz::fs_posix_acl(data));
