//! What can be checked of the container without a container engine: the Dockerfile's
//! runtime stage, the Cloud Build file, and the release-shaped run of the binary: as the
//! image's non-root user, from an empty directory, with only the variables the image
//! sets plus the deploy's settings.
mod common;

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{HMAC_SECRET, MockUpstream, PRODUCT_KEY, fixture, jwt};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// The uid and gid of distroless's `nonroot` user.
const NONROOT: u32 = 65_532;
/// What the distroless base image itself sets (its image config), besides our `ENV`s.
const BASE_IMAGE_ENV: [(&str, &str); 2] = [
    ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
    ("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"),
];

fn repo_file(name: &str) -> String {
    let path = format!("{}/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn instructions(dockerfile: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(line);
        if !current.trim().is_empty() {
            out.push(current.trim().to_owned());
        }
        current.clear();
    }
    out
}

/// The instructions of the last stage (the image that is shipped).
fn runtime_stage(dockerfile: &str) -> Vec<String> {
    let all = instructions(dockerfile);
    let last_from = all.iter().rposition(|i| i.starts_with("FROM ")).expect("a FROM");
    all[last_from..].to_vec()
}

/// `ENV NAME=value` pairs of the runtime stage.
fn image_env(stage: &[String]) -> Vec<(String, String)> {
    stage
        .iter()
        .filter_map(|i| i.strip_prefix("ENV "))
        .flat_map(str::split_whitespace)
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

#[test]
fn the_runtime_image_is_distroless_nonroot_with_only_the_binary_and_no_shell() {
    let dockerfile = repo_file("Dockerfile");
    let all = instructions(&dockerfile);
    let builder = all.iter().find(|i| i.starts_with("FROM ")).expect("a builder stage");
    assert!(
        builder.contains("trixie"),
        "the builder must share the runtime's Debian 13 glibc: {builder}"
    );
    let stage = runtime_stage(&dockerfile);
    assert_eq!(stage[0], "FROM gcr.io/distroless/cc-debian13:nonroot");
    assert!(
        stage
            .iter()
            .any(|i| i == "USER nonroot:nonroot" || i == "USER nonroot" || i == "USER 65532"),
        "a non-root USER in {stage:?}"
    );
    assert!(
        !stage.iter().any(|i| i.starts_with("RUN ")),
        "nothing runs in the runtime stage (it has no shell)"
    );
    let copies: Vec<_> = stage.iter().filter(|i| i.starts_with("COPY ")).collect();
    assert_eq!(copies.len(), 1, "only the binary is copied: {copies:?}");
    assert!(copies[0].starts_with("COPY --from=build "), "{copies:?}");
    let entrypoint = stage
        .iter()
        .find_map(|i| i.strip_prefix("ENTRYPOINT "))
        .expect("an ENTRYPOINT");
    let entrypoint: Vec<String> = serde_json::from_str(entrypoint).expect("exec form (a JSON list), no shell");
    assert_eq!(entrypoint, ["/usr/local/bin/api-key-server"]);
    let env = image_env(&stage);
    assert!(env.contains(&("PORT".to_owned(), "8080".to_owned())), "{env:?}");
    for (name, _) in &env {
        assert!(
            !name.starts_with("API_KEY_SERVER_"),
            "no setting is baked into the image: {name}"
        );
    }

    let ignore = repo_file(".dockerignore");
    let rules: Vec<&str> = ignore
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    assert_eq!(rules.first(), Some(&"*"), "the build context is an allow-list");
}

#[test]
fn cloud_build_deploys_with_secrets_from_secret_manager_only() {
    let build = repo_file("cloudbuild.yaml");
    for needed in [
        "--set-secrets",
        "API_KEY_SERVER_PRODUCT_KEYS=",
        "--timeout=3600",
        "API_KEY_SERVER_GCP_PROJECT_ID=$PROJECT_ID",
        "--no-allow-unauthenticated",
        "gcloud",
        "run",
        "deploy",
    ] {
        assert!(build.contains(needed), "{needed} in cloudbuild.yaml");
    }
    // Secrets go from Secret Manager to the service, never through a build step.
    for forbidden in ["secretEnv", "availableSecrets", "sk-", "BEGIN ", "PRIVATE KEY"] {
        assert!(!build.contains(forbidden), "{forbidden} in cloudbuild.yaml");
    }
}

/// Copies the test binary where the non-root user can run it: cargo's target directory
/// may sit under a home directory that user cannot enter.
fn install_binary(dir: &Path) -> std::path::PathBuf {
    let target = dir.join("api-key-server");
    std::fs::copy(env!("CARGO_BIN_EXE_api-key-server"), &target).expect("copy the binary");
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).expect("chmod binary");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    target
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Exactly what the container would see: the base image's variables, the Dockerfile's
/// ENV lines, and the settings a deploy passes (Secret Manager and --set-env-vars).
fn container_env(upstream_url: &str) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = BASE_IMAGE_ENV
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    env.extend(image_env(&runtime_stage(&repo_file("Dockerfile"))));
    // The image's PORT is 8080; tests use no fixed port, and Cloud Run sets PORT anyway.
    env.insert("PORT".into(), "0".into());
    let settings = [
        ("PRODUCT_KEYS", serde_json::json!({"demo": PRODUCT_KEY}).to_string()),
        (
            "JWT_PUBLIC_KEYS",
            serde_json::json!({"test-kid": fixture("jwt-public.pem")}).to_string(),
        ),
        (
            "CLIENT_HMAC_SECRETS",
            serde_json::json!({"desk": HMAC_SECRET}).to_string(),
        ),
        ("OPENAI_BASE_URL", upstream_url.to_owned()),
        ("GCP_PROJECT_ID", "my-project".to_owned()),
    ];
    env.extend(settings.into_iter().map(|(k, v)| (format!("API_KEY_SERVER_{k}"), v)));
    env
}

/// The binary as the image's `nonroot` user (through `setpriv` when the tests run as
/// root), from `workdir`, with exactly `env`.
fn container_command(binary: &Path, workdir: &Path, env: &HashMap<String, String>, as_root: bool) -> Command {
    let mut command = if as_root {
        let setpriv = "/usr/bin/setpriv";
        assert!(
            Path::new(setpriv).exists(),
            "{setpriv} (util-linux) is needed to drop to uid {NONROOT}"
        );
        let mut c = Command::new(setpriv);
        c.args([
            format!("--reuid={NONROOT}"),
            format!("--regid={NONROOT}"),
            "--clear-groups".to_owned(),
            "--".to_owned(),
        ])
        .arg(binary);
        c
    } else {
        Command::new(binary)
    };
    command
        .env_clear()
        .envs(env)
        .current_dir(workdir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Reads stdout up to the `listening` line (every line JSON) and returns its port.
async fn listening_port(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> u16 {
    let mut port = None;
    let mut seen = Vec::new();
    for _ in 0..20 {
        let Ok(Ok(Some(line))) = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await else {
            break;
        };
        let value: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: JSON logs by default: {line}"));
        seen.push(line);
        if value["message"] == "listening" {
            port = value["address"]
                .as_str()
                .and_then(|a| a.rsplit(':').next()?.parse::<u16>().ok());
            break;
        }
    }
    port.unwrap_or_else(|| panic!("a listening line in {seen:?}"))
}

#[tokio::test]
async fn the_binary_serves_as_a_non_root_user_from_an_empty_directory_with_only_the_image_variables() {
    let upstream = MockUpstream::openai().await;
    let bin_dir = tempfile::tempdir().expect("tempdir");
    let binary = install_binary(bin_dir.path());
    let workdir = tempfile::tempdir().expect("tempdir");
    let as_root = running_as_root();
    if as_root {
        std::os::unix::fs::chown(workdir.path(), Some(NONROOT), Some(NONROOT)).expect("chown workdir");
    }

    let env = container_env(&upstream.url());
    let mut command = container_command(&binary, workdir.path(), &env, as_root);
    let mut child = command.spawn().expect("the binary starts");
    let pid = child.id().expect("pid");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();

    let port = listening_port(&mut lines).await;
    // Keep reading stdout so the process never blocks on a full pipe.
    let rest = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            rest.push(line);
        }
        rest
    });

    if as_root {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        let uid = status.lines().find(|l| l.starts_with("Uid:")).expect("Uid line");
        assert!(
            uid.split_whitespace().skip(1).all(|id| id == NONROOT.to_string()),
            "runs as {NONROOT}: {uid}"
        );
    }

    let client = reqwest::Client::new();
    let health = client
        .get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), 200);
    let chat = client
        .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .bearer_auth(jwt("demo", "alice"))
        .body(common::CHAT)
        .send()
        .await
        .expect("chat");
    assert_eq!(chat.status(), 200, "a full request through the upstream client");
    chat.bytes().await.expect("body");

    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exits after SIGTERM")
        .expect("wait");
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
    let rest = rest.await.expect("reader").join("\n");
    assert!(rest.contains("\"stopped\""), "{rest}");
    for secret in [PRODUCT_KEY, HMAC_SECRET] {
        assert!(!rest.contains(secret), "a secret in the logs");
    }

    let left: Vec<_> = std::fs::read_dir(workdir.path()).expect("read workdir").collect();
    assert!(left.is_empty(), "nothing is written to disk: {left:?}");
}
