//! Compiles `proto/` with protox (pure Rust, no system `protoc`), generates the
//! tonic services, and writes the descriptor set that server reflection serves.

use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "koo/auth/v1/auth_service.proto",
    "koo/cache/v1/cache_service.proto",
    "koo/tasks/v1/task_service.proto",
    "koo/worker/v1/worker_service.proto",
    "koo/schedule/v1/schedule_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_source_info(true).include_imports(true);
    compiler.open_files(PROTOS)?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("koo_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    tonic_prost_build::configure()
        .codec_path("crate::grpc::codec::KooCodec")
        .bytes(".")
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
