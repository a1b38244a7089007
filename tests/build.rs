//! `LOCKSTEP_CUDA_TESTS=1` at build time turns the GPU tests on (`cfg(cuda_tests)`); without
//! it `cargo test` lists them as ignored rather than passing them without running anything.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(cuda_tests)");
    println!("cargo::rerun-if-env-changed=LOCKSTEP_CUDA_TESTS");
    if std::env::var("LOCKSTEP_CUDA_TESTS").is_ok_and(|v| v == "1") {
        println!("cargo::rustc-cfg=cuda_tests");
    }
}
