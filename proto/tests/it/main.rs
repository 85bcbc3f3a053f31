//! Integration tests of `fleetcmd-proto`: the committed generated code must be
//! exactly what the `.proto` files produce. Regenerate with
//! `FLEETCMD_BLESS=1 cargo test -p fleetcmd-proto`.

mod channel;

use std::path::{Path, PathBuf};

use prost::Message;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Generates the Rust code and descriptor set into `out`.
fn generate(out: &Path) -> Vec<u8> {
    let dir = crate_dir();
    let fds = protox::compile(fleetcmd_proto::PROTO_FILES, [dir.join("proto")])
        .expect("the .proto files compile");
    let encoded = fds.encode_to_vec();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::ProstCodec")
        .emit_rerun_if_changed(false)
        .out_dir(out)
        .compile_fds(fds)
        .expect("code generation succeeds");
    encoded
}

#[test]
fn generated_code_matches_proto_files() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let descriptor = generate(tmp.path());
    let fresh = std::fs::read_to_string(tmp.path().join("fleetcmd.v1.rs")).expect("generated file");
    let gen_dir = crate_dir().join("src/gen");
    let committed_path = gen_dir.join("fleetcmd.v1.rs");
    let desc_path = gen_dir.join("fleetcmd_descriptor.bin");
    if std::env::var_os("FLEETCMD_BLESS").is_some() {
        std::fs::write(&committed_path, &fresh).expect("write generated code");
        std::fs::write(&desc_path, &descriptor).expect("write descriptor");
        return;
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        committed == fresh,
        "proto/src/gen/fleetcmd.v1.rs is stale: run `FLEETCMD_BLESS=1 cargo test -p fleetcmd-proto`"
    );
    let committed_desc = std::fs::read(&desc_path).unwrap_or_default();
    assert!(
        committed_desc == descriptor,
        "proto/src/gen/fleetcmd_descriptor.bin is stale: run `FLEETCMD_BLESS=1 cargo test -p fleetcmd-proto`"
    );
}

#[test]
fn descriptor_set_names_every_service() {
    let fds = prost_types_names(fleetcmd_proto::FILE_DESCRIPTOR_SET);
    for svc in [
        "Enrollment",
        "AgentStream",
        "Jobs",
        "Agents",
        "Tokens",
        "Policy",
    ] {
        assert!(
            fds.contains(&svc.to_string()),
            "service {svc} missing from descriptor"
        );
    }
}

fn prost_types_names(bytes: &[u8]) -> Vec<String> {
    let fds = protox::prost_reflect::prost_types::FileDescriptorSet::decode(bytes)
        .expect("descriptor decodes");
    fds.file
        .iter()
        .flat_map(|f| f.service.iter().map(|s| s.name().to_string()))
        .collect()
}
