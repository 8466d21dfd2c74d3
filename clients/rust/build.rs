//! Compiles `proto/freshd/v1/coordinator.proto` (the repository's single
//! source of truth) into client stubs, without a `protoc` binary: protox parses
//! the file into a descriptor set that feeds the code generator.
//!
//! With the `serde` feature the messages derive `serde::Serialize` and
//! `serde::Deserialize` with their proto field names, and enum fields read and
//! write enum names without their prefix (`"FRESH"` for `FRESHNESS_FRESH`).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from("../../proto");
    let proto = "freshd/v1/coordinator.proto";
    println!("cargo:rerun-if-changed={}", root.join(proto).display());
    let fds = protox::compile([proto], [&root])?;

    let serde = |attr: &str| format!("#[cfg_attr(feature = \"serde\", {attr})]");
    let mut builder = tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .message_attribute(
            ".",
            serde("derive(serde::Serialize, serde::Deserialize), serde(default)"),
        );
    for name in ["Freshness", "Decision", "ResetReason", "ResumeOutcome"] {
        builder = builder.enum_attribute(
            format!(".freshd.v1.{name}"),
            serde("derive(serde::Serialize, serde::Deserialize), serde(rename_all = \"SCREAMING_SNAKE_CASE\")"),
        );
    }
    for oneof in [
        ".freshd.v1.WatchRequest.request",
        ".freshd.v1.WatchResponse.response",
    ] {
        builder = builder.enum_attribute(
            oneof,
            serde(
                "derive(serde::Serialize, serde::Deserialize), serde(rename_all = \"snake_case\")",
            ),
        );
    }
    let enum_fields = [
        ("CheckResponse.freshness", "freshness"),
        ("CheckResponse.decision", "decision"),
        ("CheckResult.freshness", "freshness"),
        ("CheckResult.decision", "decision"),
        ("Reset.reason", "reset_reason"),
        ("WatchStarted.outcome", "resume_outcome"),
    ];
    for (field, module) in enum_fields {
        builder = builder.field_attribute(
            format!(".freshd.v1.{field}"),
            serde(&format!("serde(with = \"crate::serde_enum::{module}\")")),
        );
    }
    for field in [
        "Change.external_version",
        "InspectResponse.external_version",
        "FreshnessPolicy.check_sample_rate",
    ] {
        builder = builder.field_attribute(
            format!(".freshd.v1.{field}"),
            serde("serde(skip_serializing_if = \"Option::is_none\")"),
        );
    }
    builder.compile_fds(fds)?;
    Ok(())
}
