//! What can be checked of the Cloud Run deploy without Google Cloud: the files render and
//! parse the way the docs say, they name only settings the service knows and secrets the
//! docs create, gcloud gets each per-container flag after its `--container`, and every
//! shell snippet of the docs is valid bash.
//!
//! Each check runs the real text: the docs' render block and cloudbuild.yaml's deploy
//! script are executed by bash with `gcloud` and `git` replaced by functions that record
//! their arguments.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use api_key_server::settings::{KNOWN_VARIABLES, PREFIX};
use serde_yaml_ng::Value;

const PROJECT: &str = "my-project";
const REGION: &str = "asia-northeast1";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn repo_file(name: &str) -> String {
    let path = format!("{}/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The fenced blocks of a Markdown text whose info string is one of `langs`.
fn code_blocks(markdown: &str, langs: &[&str]) -> Vec<String> {
    let mut blocks = Vec::new();
    // Inside a block: whether it is kept, and its text so far.
    let mut current: Option<(bool, String)> = None;
    for line in markdown.lines() {
        if let Some(info) = line.trim_start().strip_prefix("```") {
            match current.take() {
                Some((true, block)) => blocks.push(block),
                Some((false, _)) => {}
                None => current = Some((langs.contains(&info.trim()), String::new())),
            }
            continue;
        }
        if let Some((_, block)) = current.as_mut() {
            // Blocks inside list items are indented; bash does not mind.
            block.push_str(line);
            block.push('\n');
        }
    }
    blocks
}

/// `bash -n` on `script`; the error text when it does not parse.
fn bash_syntax_error(script: &str) -> Option<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("snippet.sh");
    std::fs::write(&file, script).expect("write snippet");
    let out = Command::new("bash").arg("-n").arg(&file).output().expect("bash runs");
    (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The docs' shell snippets: their `bash`, `sh` and `console` blocks (a console block's
/// commands are its `$ ` lines and their continuations).
fn shell_snippets(markdown: &str) -> Vec<String> {
    let mut snippets = code_blocks(markdown, &["bash", "sh"]);
    for block in code_blocks(markdown, &["console"]) {
        let mut commands = String::new();
        let mut continued = false;
        for line in block.lines() {
            let command = line.trim_start().strip_prefix("$ ");
            if let Some(command) = command.or(continued.then_some(line)) {
                commands.push_str(command);
                commands.push('\n');
                continued = command.ends_with('\\');
            }
        }
        snippets.push(commands);
    }
    snippets
}

const DOCS: [&str; 3] = ["docs/cloud-run.md", "docs/cloud-run.ja.md", "README.md"];

#[test]
fn every_shell_snippet_in_the_docs_is_valid_bash() {
    let mut checked = 0;
    for doc in DOCS {
        for snippet in shell_snippets(&repo_file(doc)) {
            if let Some(error) = bash_syntax_error(&snippet) {
                panic!("{doc}: a snippet bash cannot parse:\n{snippet}\n{error}");
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 20,
        "only {checked} snippets found: the block parser is broken"
    );
}

#[test]
fn the_syntax_check_finds_a_broken_snippet() {
    let broken = "```sh\nfor s in a b; do\n  echo $s\n```\n";
    let snippets = shell_snippets(broken);
    assert_eq!(snippets.len(), 1);
    assert!(
        bash_syntax_error(&snippets[0]).is_some(),
        "an unclosed loop must fail bash -n"
    );
    let console = "```console\n$ echo a \\\n  b\noutput line ((\n$ if true\n```\n";
    let snippets = shell_snippets(console);
    assert_eq!(snippets, ["echo a \\\n  b\nif true\n"]);
    assert!(bash_syntax_error(&snippets[0]).is_some());
}

/// Names the docs create with `gcloud secrets create NAME`.
fn secrets_created(markdown: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for block in code_blocks(markdown, &["sh", "bash"]) {
        for line in block.lines() {
            if let Some(rest) = line.split("gcloud secrets create ").nth(1) {
                let name = rest.split_whitespace().next().expect("a secret name");
                names.insert(name.to_owned());
            }
        }
    }
    names
}

fn documented_secrets() -> BTreeSet<String> {
    let english = secrets_created(&repo_file("docs/cloud-run.md"));
    let japanese = secrets_created(&repo_file("docs/cloud-run.ja.md"));
    assert_eq!(english, japanese, "both guides create the same secrets");
    assert!(english.contains("api-key-server-product-keys"), "{english:?}");
    english
}

/// Every `API_KEY_SERVER_*` word in `text` that the service does not know.
fn unknown_settings(text: &str) -> Vec<String> {
    let mut unknown = Vec::new();
    for (start, _) in text.match_indices(PREFIX) {
        let name: String = text[start..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let rest = &name[PREFIX.len()..];
        if !KNOWN_VARIABLES.contains(&rest) {
            unknown.push(name);
        }
    }
    unknown
}

#[test]
fn the_deploy_files_name_only_known_settings() {
    for file in ["deploy/service.yaml", "cloudbuild.yaml"] {
        let text = repo_file(file);
        assert!(text.contains(PREFIX), "{file} names settings");
        let unknown = unknown_settings(&text);
        assert!(unknown.is_empty(), "{file}: unknown settings {unknown:?}");
    }
    // The check itself: a typo and a name mangled by a careless substitution are caught.
    assert_eq!(
        unknown_settings("API_KEY_SERVER_PRODUCT_KEY=x API_KEY_SERVER_GCP_my-project"),
        ["API_KEY_SERVER_PRODUCT_KEY", "API_KEY_SERVER_GCP_"]
    );
}

// ---- deploy/service.yaml, rendered as docs/cloud-run.md says ----

/// The docs' block that renders deploy/service.yaml.
fn render_block(doc: &str) -> String {
    code_blocks(&repo_file(doc), &["sh"])
        .into_iter()
        .find(|b| b.contains("deploy/service.yaml > service.rendered.yaml"))
        .unwrap_or_else(|| panic!("{doc}: no block renders deploy/service.yaml"))
}

/// The block with its `REDIS=''` line set to the value its comment gives for Memorystore.
fn with_redis(block: &str) -> String {
    let line = block
        .lines()
        .find(|l| l.starts_with("REDIS=''"))
        .expect("a REDIS='' line");
    let on = line
        .split_once("REDIS='s/")
        .map(|(_, rest)| format!("REDIS='s/{rest}"))
        .expect("the comment gives the Redis value");
    block.replace(line, &on)
}

/// Runs `block` in a directory holding `service_yaml` as deploy/service.yaml, with the
/// variables of section 1 set and `gcloud`/`git` stubbed; returns the rendered file and
/// the gcloud calls.
fn run_render(block: &str, service_yaml: &str) -> (String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("deploy")).expect("mkdir");
    std::fs::write(dir.path().join("deploy/service.yaml"), service_yaml).expect("write");
    let script = format!(
        "set -euo pipefail\n\
         gcloud() {{ printf '%s\\n' \"gcloud $*\" >> gcloud.calls; }}\n\
         git() {{ echo {COMMIT}; }}\n\
         PROJECT_ID={PROJECT}\nREGION={REGION}\n{block}"
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "the render block fails: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
    (read("service.rendered.yaml"), read("gcloud.calls"))
}

/// Every string in a YAML value, keys included.
fn strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Sequence(items) => items.iter().for_each(|v| strings(v, out)),
        Value::Mapping(map) => map.iter().for_each(|(k, v)| {
            strings(k, out);
            strings(v, out);
        }),
        Value::Tagged(tagged) => strings(&tagged.value, out),
        _ => {}
    }
}

/// The rendered service's env var names and the (secret, version) pairs it references.
fn service_references(service: &Value) -> (Vec<String>, Vec<(String, String)>) {
    let spec = &service["spec"]["template"]["spec"];
    let mut names = Vec::new();
    let mut secrets = Vec::new();
    for container in spec["containers"].as_sequence().expect("containers") {
        for var in container["env"].as_sequence().into_iter().flatten() {
            names.push(var["name"].as_str().expect("env name").to_owned());
            let reference = &var["valueFrom"]["secretKeyRef"];
            if !reference.is_null() {
                let version = reference["key"].as_str().expect("a version as a string");
                secrets.push((reference["name"].as_str().expect("name").to_owned(), version.to_owned()));
            }
        }
    }
    for volume in spec["volumes"].as_sequence().into_iter().flatten() {
        let secret = &volume["secret"];
        for item in secret["items"].as_sequence().into_iter().flatten() {
            secrets.push((
                secret["secretName"].as_str().expect("secretName").to_owned(),
                item["key"].as_str().expect("a version as a string").to_owned(),
            ));
        }
    }
    (names, secrets)
}

/// The checks on one rendered service.yaml; the first problem found.
fn check_rendered(rendered: &str, calls: &str, created: &BTreeSet<String>) -> Result<Vec<String>, String> {
    let service: Value = serde_yaml_ng::from_str(rendered).map_err(|e| format!("not YAML: {e}"))?;
    let mut all = Vec::new();
    strings(&service, &mut all);
    if let Some(left) = all.iter().find(|s| s.contains("__")) {
        return Err(format!("a placeholder is left: {left}"));
    }
    let spec = &service["spec"]["template"]["spec"];
    let image = spec["containers"][0]["image"].as_str().unwrap_or_default();
    let expected = format!("{REGION}-docker.pkg.dev/{PROJECT}/api-key-server/api-key-server:{COMMIT}");
    if image != expected {
        return Err(format!("image {image}, expected {expected}"));
    }
    let (names, secrets) = service_references(&service);
    for name in &names {
        let known = name
            .strip_prefix(PREFIX)
            .is_some_and(|rest| KNOWN_VARIABLES.contains(&rest));
        if !known {
            return Err(format!("unknown setting {name}"));
        }
    }
    for (secret, version) in &secrets {
        if !created.contains(secret) {
            return Err(format!("secret {secret} is not created in the docs"));
        }
        if version.parse::<u32>().map_or(true, |v| v == 0) {
            return Err(format!("secret {secret} at version {version:?}, not a pinned number"));
        }
    }
    if !calls.contains("gcloud run services replace service.rendered.yaml") {
        return Err(format!("the block does not apply the rendered file: {calls}"));
    }
    Ok(names)
}

#[test]
fn service_yaml_renders_as_the_docs_say_with_and_without_redis() {
    let created = documented_secrets();
    let template = repo_file("deploy/service.yaml");
    for doc in ["docs/cloud-run.md", "docs/cloud-run.ja.md"] {
        let block = render_block(doc);
        let (rendered, calls) = run_render(&block, &template);
        let names = check_rendered(&rendered, &calls, &created).unwrap_or_else(|e| panic!("{doc}: {e}"));
        assert!(names.contains(&"API_KEY_SERVER_GCP_PROJECT_ID".to_owned()), "{names:?}");
        assert!(
            !names.iter().any(|n| n.contains("REDIS")),
            "{doc}: without Redis no Redis secret is named (its deploy would fail): {names:?}"
        );
        let active = |text: &str, what: &str| {
            text.lines()
                .any(|l| !l.trim_start().starts_with('#') && l.contains(what))
        };
        assert!(
            !active(&rendered, "network-interfaces"),
            "{doc}: no VPC egress without Redis"
        );

        let (rendered, calls) = run_render(&with_redis(&block), &template);
        let names = check_rendered(&rendered, &calls, &created).unwrap_or_else(|e| panic!("{doc}, Redis: {e}"));
        for name in ["API_KEY_SERVER_REDIS_URL", "API_KEY_SERVER_REDIS_CA_CERT"] {
            assert!(names.contains(&name.to_owned()), "{doc}: {name} with Redis: {names:?}");
        }
        assert!(active(&rendered, "vpc-access-egress: private-ranges-only"), "{doc}");
    }
    assert_eq!(
        render_block("docs/cloud-run.md")
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .map(|l| l.split(" # ").next().unwrap_or(l).trim_end().to_owned())
            .collect::<Vec<_>>(),
        render_block("docs/cloud-run.ja.md")
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .map(|l| l.split(" # ").next().unwrap_or(l).trim_end().to_owned())
            .collect::<Vec<_>>(),
        "both guides render with the same commands"
    );
}

#[test]
fn the_render_check_fails_on_a_colliding_placeholder_a_missing_secret_or_latest() {
    let created = documented_secrets();
    let block = render_block("docs/cloud-run.md");
    let template = repo_file("deploy/service.yaml");
    // The old placeholder style: `s/PROJECT_ID/.../g` also rewrites the setting's name.
    let colliding = template.replace("__PROJECT_ID__", "PROJECT_ID");
    let colliding_block = block.replace("__PROJECT_ID__", "PROJECT_ID");
    let (rendered, calls) = run_render(&colliding_block, &colliding);
    let error = check_rendered(&rendered, &calls, &created).expect_err("a mangled setting name");
    assert!(error.contains("API_KEY_SERVER_GCP_my-project"), "{error}");
    // A secret the docs never create.
    let (rendered, calls) = run_render(&block, &template.replace("api-key-server-hmac-secrets", "hmac"));
    let error = check_rendered(&rendered, &calls, &created).expect_err("an unknown secret");
    assert!(error.contains("hmac is not created"), "{error}");
    // A version that follows Secret Manager at each instance start.
    let latest = template.replace("\"__PRODUCT_KEYS_VERSION__\"", "latest");
    let (rendered, calls) = run_render(&block, &latest);
    let error = check_rendered(&rendered, &calls, &created).expect_err("latest");
    assert!(error.contains("not a pinned number"), "{error}");
    // Something that is not YAML.
    let broken = template.replace("      containers:", "      containers: [");
    let (rendered, calls) = run_render(&block, &broken);
    let error = check_rendered(&rendered, &calls, &created).expect_err("broken YAML");
    assert!(error.contains("not YAML"), "{error}");
}

// ---- cloudbuild.yaml's deploy step, run as Cloud Build would ----

/// Cloud Build's substitution: `$$` is `$`, `$NAME` / `${NAME}` come from `values`; any
/// other `$NAME` fails the build, so it fails here too.
fn substitute(script: &str, values: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = script;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
            continue;
        }
        let (name, tail) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').ok_or("an unclosed ${")?;
            (&braced[..end], &braced[end + 1..])
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        let value = values
            .get(name)
            .ok_or_else(|| format!("${name} is not a substitution Cloud Build knows"))?;
        out.push_str(value);
        rest = tail;
    }
    out.push_str(rest);
    Ok(out)
}

fn cloud_build() -> Value {
    serde_yaml_ng::from_str(&repo_file("cloudbuild.yaml")).expect("cloudbuild.yaml is YAML")
}

/// The deploy step's bash script.
fn deploy_script(build: &Value) -> String {
    let step = build["steps"]
        .as_sequence()
        .expect("steps")
        .iter()
        .find(|s| s["id"] == "deploy")
        .expect("a deploy step");
    assert_eq!(step["entrypoint"], "bash");
    let args = step["args"].as_sequence().expect("args");
    args.last().and_then(Value::as_str).expect("the script").to_owned()
}

/// The substitutions a trigger would pass: the file's defaults, Cloud Build's own, the
/// versions section 4 sets, and `overrides`.
fn substitutions(build: &Value, overrides: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut values: BTreeMap<String, String> = build["substitutions"]
        .as_mapping()
        .expect("substitutions")
        .iter()
        .map(|(k, v)| {
            let value = v.as_str().map_or_else(|| format!("{v:?}"), str::to_owned);
            (k.as_str().expect("key").to_owned(), value)
        })
        .collect();
    for (k, v) in [("PROJECT_ID", PROJECT), ("COMMIT_SHA", COMMIT)] {
        values.insert(k.to_owned(), v.to_owned());
    }
    for (k, v) in overrides {
        values.insert((*k).to_owned(), (*v).to_owned());
    }
    values
}

/// Runs the deploy script with `gcloud` recording its argv; the argv of each call, or
/// the script's error output when it fails.
fn run_deploy(script: &str, values: &BTreeMap<String, String>) -> Result<Vec<Vec<String>>, String> {
    let script = substitute(script, values)?;
    let dir = tempfile::tempdir().expect("tempdir");
    let stub = "gcloud() { printf '%s\\n' \"$@\" >> gcloud.calls; printf -- '--END--\\n' >> gcloud.calls; }\n";
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c"])
        .arg(format!("{stub}{script}"))
        .current_dir(dir.path())
        .output()
        .expect("bash runs");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let calls = std::fs::read_to_string(dir.path().join("gcloud.calls")).unwrap_or_default();
    Ok(calls
        .split("--END--\n")
        .filter(|c| !c.is_empty())
        .map(|c| c.lines().map(str::to_owned).collect())
        .collect())
}

/// Flags gcloud takes per container once `--container` is used.
const PER_CONTAINER: [&str; 14] = [
    "--image",
    "--port",
    "--cpu",
    "--memory",
    "--set-secrets",
    "--update-secrets",
    "--set-env-vars",
    "--update-env-vars",
    "--command",
    "--args",
    "--depends-on",
    "--startup-probe",
    "--liveness-probe",
    "--gpu",
];

fn flag_name(arg: &str) -> &str {
    arg.split('=').next().unwrap_or(arg)
}

/// With `--container`, every per-container flag must come after one, and each container
/// names its image; the first problem found.
fn check_container_flags(argv: &[String]) -> Result<(), String> {
    let Some(first) = argv.iter().position(|a| flag_name(a) == "--container") else {
        return Ok(());
    };
    if let Some(early) = argv[..first].iter().find(|a| PER_CONTAINER.contains(&flag_name(a))) {
        return Err(format!("{early} stands before the first --container"));
    }
    for container in argv[first..].split(|a| flag_name(a) == "--container").skip(1) {
        if !container.iter().any(|a| flag_name(a) == "--image") {
            return Err(format!("a container without --image: {container:?}"));
        }
    }
    Ok(())
}

/// The secrets (name, version) and setting names of one `gcloud run deploy` argv.
fn deploy_references(argv: &[String]) -> (Vec<(String, String)>, Vec<String>) {
    let mut secrets = Vec::new();
    let mut settings = Vec::new();
    for arg in argv {
        let (flag, value) = arg.split_once('=').unwrap_or((arg, ""));
        // gcloud's list escaping: `^D^a=1Db=2` separates the items with `D` instead of `,`.
        let (separator, value) = match value.strip_prefix('^').and_then(|v| v.split_once('^')) {
            Some((separator, rest)) => (separator, rest),
            None => (",", value),
        };
        let pairs = value.split(separator).filter_map(|p| p.split_once('='));
        match flag {
            "--set-secrets" => {
                for (target, reference) in pairs {
                    let (name, version) = reference.rsplit_once(':').unwrap_or((reference, ""));
                    secrets.push((name.to_owned(), version.to_owned()));
                    if !target.starts_with('/') {
                        settings.push(target.to_owned());
                    }
                }
            }
            "--set-env-vars" => settings.extend(pairs.map(|(k, _)| k.to_owned())),
            _ => {}
        }
    }
    (secrets, settings)
}

/// All checks on the deploy step for one combination of options; the first problem.
fn check_deploy(
    script: &str,
    values: &BTreeMap<String, String>,
    created: &BTreeSet<String>,
) -> Result<Vec<String>, String> {
    let calls = run_deploy(script, values)?;
    let [argv] = calls.as_slice() else {
        return Err(format!("expected one gcloud call, got {calls:?}"));
    };
    if argv[..3] != ["run", "deploy", "api-key-server"] {
        return Err(format!("not a deploy: {argv:?}"));
    }
    check_container_flags(argv)?;
    let (secrets, settings) = deploy_references(argv);
    for (name, version) in &secrets {
        if !created.contains(name) {
            return Err(format!("secret {name} is not created in the docs"));
        }
        if version.parse::<u32>().map_or(true, |v| v == 0) {
            return Err(format!("secret {name} at version {version:?}"));
        }
    }
    if let Some(unknown) = settings
        .iter()
        .find(|s| !s.strip_prefix(PREFIX).is_some_and(|r| KNOWN_VARIABLES.contains(&r)))
    {
        return Err(format!("unknown setting {unknown}"));
    }
    Ok(argv.clone())
}

const VERSIONS: [(&str, &str); 6] = [
    ("_PRODUCT_KEYS_VERSION", "3"),
    ("_JWT_PUBLIC_KEYS_VERSION", "2"),
    ("_HMAC_SECRETS_VERSION", "1"),
    ("_REDIS_URL_VERSION", "1"),
    ("_REDIS_CA_CERT_VERSION", "1"),
    ("_GMP_CONFIG_VERSION", "1"),
];

#[test]
fn the_cloud_build_deploy_step_passes_per_container_flags_after_their_container() {
    let created = documented_secrets();
    let build = cloud_build();
    let script = deploy_script(&build);
    assert!(bash_syntax_error(&script.replace("$$", "$")).is_none());
    for redis in ["false", "true"] {
        for metrics in ["false", "true"] {
            let mut overrides = VERSIONS.to_vec();
            overrides.extend([("_REDIS", redis), ("_METRICS", metrics)]);
            let values = substitutions(&build, &overrides);
            let argv = check_deploy(&script, &values, &created)
                .unwrap_or_else(|e| panic!("_REDIS={redis} _METRICS={metrics}: {e}"));
            let joined = argv.join(" ");
            assert!(joined.contains("--max-instances=10"), "{joined}");
            assert!(
                joined.contains("API_KEY_SERVER_PRODUCT_KEYS=api-key-server-product-keys:3"),
                "{joined}"
            );
            assert_eq!(joined.contains("REDIS_URL"), redis == "true", "{joined}");
            assert_eq!(joined.contains("--network="), redis == "true", "{joined}");
            assert_eq!(joined.contains("--container=collector"), metrics == "true", "{joined}");
        }
    }
    // The cloud build file records the pushed image.
    let images = build["images"].as_sequence().expect("images:");
    assert!(
        images
            .iter()
            .any(|i| i.as_str().is_some_and(|i| i.ends_with(":$COMMIT_SHA")))
    );
}

#[test]
fn the_cloud_build_deploy_step_passes_product_upstreams_whole() {
    let created = documented_secrets();
    let build = cloud_build();
    let script = deploy_script(&build);
    let upstreams =
        r#"{"hr-bot":{"base_url":"https://r.openai.azure.com/openai/v1","auth":"api-key","models":["a","b"]}}"#;
    for metrics in ["false", "true"] {
        let mut overrides = VERSIONS.to_vec();
        overrides.extend([("_METRICS", metrics), ("_PRODUCT_UPSTREAMS", upstreams)]);
        let argv = check_deploy(&script, &substitutions(&build, &overrides), &created)
            .unwrap_or_else(|e| panic!("_METRICS={metrics}: {e}"));
        let env = argv
            .iter()
            .find_map(|a| a.strip_prefix("--set-env-vars="))
            .expect("--set-env-vars");
        let items: Vec<&str> = env.strip_prefix("^|^").expect("the `|` delimiter").split('|').collect();
        assert!(
            items.contains(&format!("API_KEY_SERVER_PRODUCT_UPSTREAMS={upstreams}").as_str()),
            "{items:?}"
        );
        assert_eq!(items.contains(&"API_KEY_SERVER_METRICS_PORT=9464"), metrics == "true");
    }
    // Without it, the setting is not passed at all.
    let argv = check_deploy(&script, &substitutions(&build, &VERSIONS), &created).expect("deploys");
    assert!(!argv.join(" ").contains("PRODUCT_UPSTREAMS"));
}

#[test]
fn the_deploy_step_refuses_a_secret_version_that_is_not_a_number() {
    let created = documented_secrets();
    let build = cloud_build();
    let script = deploy_script(&build);
    for bad in ["", "latest"] {
        let mut overrides = VERSIONS.to_vec();
        overrides.push(("_PRODUCT_KEYS_VERSION", bad));
        let error = check_deploy(&script, &substitutions(&build, &overrides), &created).expect_err("refused");
        assert!(error.contains("_PRODUCT_KEYS_VERSION"), "{error}");
    }
}

#[test]
fn the_deploy_checks_fail_on_a_misplaced_flag_an_unknown_secret_or_setting() {
    let created = documented_secrets();
    let build = cloud_build();
    let script = deploy_script(&build);
    let mut overrides = VERSIONS.to_vec();
    overrides.extend([("_REDIS", "true"), ("_METRICS", "true")]);
    let values = substitutions(&build, &overrides);
    // The bug this guards against: --cpu and --memory among the service-wide flags.
    let misplaced = script
        .replace("  --cpu=1\n  --memory=512Mi\n", "")
        .replace("  --cpu-boost\n", "  --cpu-boost\n  --cpu=1\n");
    assert_ne!(misplaced, script);
    let error = check_deploy(&misplaced, &values, &created).expect_err("misplaced --cpu");
    assert!(error.contains("--cpu=1 stands before the first --container"), "{error}");
    // A secret the docs never create.
    let mut renamed = values.clone();
    renamed.insert("_SECRET_HMAC_SECRETS".into(), "hmac".into());
    let error = check_deploy(&script, &renamed, &created).expect_err("unknown secret");
    assert!(error.contains("hmac is not created"), "{error}");
    // A setting the service does not know.
    let typo = script.replace("API_KEY_SERVER_METRICS_PORT", "API_KEY_SERVER_METRIC_PORT");
    let error = check_deploy(&typo, &values, &created).expect_err("unknown setting");
    assert!(error.contains("API_KEY_SERVER_METRIC_PORT"), "{error}");
    // A shell variable Cloud Build would take for a substitution.
    let unescaped = script.replace("$${secrets}", "${secrets}");
    let error = check_deploy(&unescaped, &values, &created).expect_err("unescaped $");
    assert!(error.contains("$secrets is not a substitution"), "{error}");
}

#[test]
fn the_artifact_registry_cleanup_policy_is_json_and_keeps_the_build_cache() {
    let text = repo_file("deploy/artifact-cleanup.json");
    let policies: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let policies = policies.as_array().expect("a list of policies");
    assert!(policies.iter().any(|p| p["action"]["type"] == "Delete"));
    assert!(
        policies
            .iter()
            .any(|p| p["action"]["type"] == "Keep" && p["condition"]["tagPrefixes"][0] == "build-cache")
    );
}
