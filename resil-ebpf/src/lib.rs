//! Empty on the host: it exists so `resil-user` can name this crate as a build dependency and be
//! rebuilt when the programs (built from `main.rs` for the BPF target) change.
#![no_std]
