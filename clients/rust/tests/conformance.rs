//! Runs every scenario of `tests/conformance/*.json` (the language-neutral
//! conformance suite; its README describes the format) against a fresh
//! in-process server per scenario, through this crate's typed [`Client`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use freshd::config::{Args, Config};
use freshd::server::RunningServer;
use freshd_client::{code_name, pb, Client, Watch, WatchEvent};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

/// Step fields that are not request fields.
const STEP_KEYS: &[&str] = &[
    "op",
    "expect",
    "expect_error",
    "expect_error_contains",
    "save",
    "stream",
];

/// `tests/conformance` of the repository, or `FRESHD_CONFORMANCE_DIR`.
fn scenario_dir() -> PathBuf {
    match std::env::var_os("FRESHD_CONFORMANCE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/conformance"),
    }
}

/// The server settings of a scenario, as flags (`{"lease_ttl": "200ms"}` is
/// `--lease-ttl 200ms`), on an ephemeral loopback port without admin HTTP.
fn config(settings: Option<&Value>) -> Config {
    let mut argv = vec![
        "freshd".to_owned(),
        "--listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--admin-listen".to_owned(),
        "off".to_owned(),
    ];
    if let Some(settings) = settings {
        let settings = settings.as_object().expect("\"server\" is an object");
        for (name, value) in settings {
            let value = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            argv.push(format!("--{}", name.replace('_', "-")));
            argv.push(value);
        }
    }
    let args = <Args as clap::Parser>::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("server settings {argv:?}: {e}"));
    Config::from_args(args).unwrap_or_else(|e| panic!("server settings {argv:?}: {e}"))
}

/// Replaces every string `"$name"` by the variable `name`.
fn substitute(value: &Value, vars: &HashMap<String, Value>) -> Result<Value, String> {
    Ok(match value {
        Value::String(s) if s.starts_with('$') => vars
            .get(&s[1..])
            .cloned()
            .ok_or_else(|| format!("variable {s} is not set (no earlier step saved it)"))?,
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| substitute(v, vars))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), substitute(v, vars)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

/// The request fields of a step (the step without `op`, `expect`, ...),
/// decoded as `T`. A field `T` does not have, at any depth, is an error, not
/// ignored.
fn request<T: DeserializeOwned + Serialize>(step: &Map<String, Value>) -> Result<T, String> {
    let fields = Value::Object(
        step.iter()
            .filter(|(k, _)| !STEP_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    );
    let request: T =
        serde_json::from_value(fields.clone()).map_err(|e| format!("bad request: {e}"))?;
    // What decoding kept: every field given must be in it.
    unknown_field(&fields, &json(&request), "request").map_or(Ok(request), |path| {
        Err(format!(
            "{path} is not a field of {}",
            std::any::type_name::<T>()
        ))
    })
}

/// The first field of `given` that `kept` lacks.
fn unknown_field(given: &Value, kept: &Value, path: &str) -> Option<String> {
    match (given, kept) {
        (Value::Object(g), Value::Object(k)) => g.iter().find_map(|(name, v)| match k.get(name) {
            Some(kv) => unknown_field(v, kv, &format!("{path}.{name}")),
            None if v.is_null() => None,
            None => Some(format!("{path}.{name}")),
        }),
        (Value::Array(g), Value::Array(k)) => g
            .iter()
            .zip(k)
            .enumerate()
            .find_map(|(i, (gv, kv))| unknown_field(gv, kv, &format!("{path}[{i}]"))),
        _ => None,
    }
}

fn json<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("messages serialize")
}

/// Subset matching: every field of `expected` must be in `actual` and
/// match; lists match element by element with the same length; numbers
/// compare as integers.
fn matches(expected: &Value, actual: &Value, path: &str) -> Result<(), String> {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                let av = a
                    .get(k)
                    .ok_or_else(|| format!("{path}.{k}: missing in the response {actual}"))?;
                matches(ev, av, &format!("{path}.{k}"))?;
            }
            Ok(())
        }
        (Value::Array(e), Value::Array(a)) => {
            if e.len() != a.len() {
                return Err(format!(
                    "{path}: expected {} elements, got {}: {actual}",
                    e.len(),
                    a.len()
                ));
            }
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                matches(ev, av, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        (Value::Number(e), Value::Number(a)) => {
            let same = match (e.as_i64(), a.as_i64(), e.as_u64(), a.as_u64()) {
                (Some(x), Some(y), _, _) => x == y,
                (_, _, Some(x), Some(y)) => x == y,
                _ => e.as_f64() == a.as_f64(),
            };
            if same {
                Ok(())
            } else {
                Err(format!("{path}: expected {e}, got {a}"))
            }
        }
        (e, a) if e == a => Ok(()),
        (e, a) => Err(format!("{path}: expected {e}, got {a}")),
    }
}

/// The outcome of one step: a response as JSON, or a gRPC status.
enum Outcome {
    Response(Value),
    Status { code: &'static str, message: String },
}

fn outcome<T: Serialize>(result: freshd_client::Result<T>) -> Result<Outcome, String> {
    match result {
        Ok(response) => Ok(Outcome::Response(json(&response))),
        Err(e) => match e.code() {
            Some(code) => Ok(Outcome::Status {
                code: code_name(code),
                message: e.message(),
            }),
            None => Err(format!("the call failed outside gRPC: {e}")),
        },
    }
}

struct Runner {
    client: Client,
    vars: HashMap<String, Value>,
    streams: HashMap<String, Watch>,
}

impl Runner {
    async fn step(&mut self, step: &Map<String, Value>) -> Result<Outcome, String> {
        let op = step
            .get("op")
            .and_then(Value::as_str)
            .ok_or("a step needs an \"op\"")?;
        let c = &self.client;
        match op {
            "publish" => outcome(c.publish(request::<pb::PublishRequest>(step)?).await),
            "fill" => outcome(c.fill(request::<pb::FillRequest>(step)?).await),
            "check" => outcome(c.check(request::<pb::CheckRequest>(step)?).await),
            "check_batch" => outcome(c.check_batch(request::<pb::CheckBatchRequest>(step)?).await),
            "inspect" => outcome(c.inspect(request::<pb::InspectRequest>(step)?.key).await),
            "stats" => {
                request::<pb::StatsRequest>(step)?;
                outcome(c.stats().await)
            }
            "lease" => outcome(c.lease(request::<pb::LeaseRequest>(step)?).await),
            "purge" => outcome(c.purge(request::<pb::PurgeRequest>(step)?).await),
            "set_policy" => {
                let r = request::<pb::SetPolicyRequest>(step)?;
                outcome(
                    c.set_policy(r.namespace, r.policy.unwrap_or_default())
                        .await,
                )
            }
            "get_policy" => outcome(
                c.get_policy(request::<pb::GetPolicyRequest>(step)?.namespace)
                    .await,
            ),
            "watch_open" => {
                let name = stream_name(step)?;
                let start = request::<pb::WatchStart>(step)?;
                match c.watch(start).await {
                    Ok(watch) => {
                        let started = json(&watch.started);
                        self.streams.insert(name, watch);
                        Ok(Outcome::Response(started))
                    }
                    Err(e) => outcome::<()>(Err(e)),
                }
            }
            "watch_send" => {
                let stream = self.stream(step)?;
                let mut sent = 0;
                let list = |k: &str| -> Result<Option<Vec<String>>, String> {
                    step.get(k)
                        .map(|v| serde_json::from_value(v.clone()).map_err(|e| format!("{k}: {e}")))
                        .transpose()
                };
                let fail = |e: freshd_client::Error| e.to_string();
                if let Some(keys) = list("track")? {
                    stream.track(keys).map_err(fail)?;
                    sent += 1;
                }
                if let Some(keys) = list("untrack")? {
                    stream.untrack(keys).map_err(fail)?;
                    sent += 1;
                }
                if let Some(keys) = list("subscribe")? {
                    stream.subscribe(keys).map_err(fail)?;
                    sent += 1;
                }
                if let Some(keys) = list("unsubscribe")? {
                    stream.unsubscribe(keys).map_err(fail)?;
                    sent += 1;
                }
                if let Some(seq) = step.get("ack") {
                    let seq = seq.as_u64().ok_or("ack is a seq")?;
                    stream.ack(seq).map_err(fail)?;
                    sent += 1;
                }
                if sent == 0 {
                    return Err(
                        "watch_send needs track, untrack, subscribe, unsubscribe or ack".into(),
                    );
                }
                Ok(Outcome::Response(Value::Object(Map::new())))
            }
            "watch_sync" => {
                let stream = self.stream(step)?;
                if let Err(closed) = stream.progress() {
                    // The stream ended before the request went out (a
                    // request before it was refused, say): why is its last
                    // event.
                    return loop {
                        let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
                            .await
                            .map_err(|_| "no end within 10 s".to_owned())?;
                        match event {
                            Some(Ok(_)) => continue,
                            Some(Err(e)) => break outcome::<()>(Err(e)),
                            None => break Err(closed.to_string()),
                        }
                    };
                }
                let mut notices = Vec::new();
                let mut resets = Vec::new();
                let mut refused = Vec::new();
                let progress = loop {
                    let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
                        .await
                        .map_err(|_| "no progress within 10 s".to_owned())?;
                    match event {
                        Some(Ok(WatchEvent::Notices(batch))) => {
                            notices.extend(batch.iter().map(json));
                        }
                        Some(Ok(WatchEvent::Reset(reset))) => resets.push(json(&reset)),
                        Some(Ok(WatchEvent::Progress(p))) => break p.seq,
                        Some(Ok(WatchEvent::Refused(r))) => refused.push(serde_json::json!({
                            "request": r.request,
                            "code": code_name(tonic::Code::from_i32(r.code)),
                            "message": r.message,
                        })),
                        Some(Err(e)) => return outcome::<()>(Err(e)),
                        None => return Err("the stream ended before the progress".into()),
                    }
                };
                Ok(Outcome::Response(serde_json::json!({
                    "notices": notices,
                    "resets": resets,
                    "refused": refused,
                    "progress": progress,
                })))
            }
            "watch_close" => {
                let name = stream_name(step)?;
                self.streams
                    .remove(&name)
                    .ok_or_else(|| format!("no stream {name:?} is open"))?;
                Ok(Outcome::Response(Value::Object(Map::new())))
            }
            "sleep" => {
                let ms = step
                    .get("ms")
                    .and_then(Value::as_u64)
                    .ok_or("sleep needs ms")?;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(Outcome::Response(Value::Object(Map::new())))
            }
            other => Err(format!("unknown op {other:?}")),
        }
    }

    fn stream(&mut self, step: &Map<String, Value>) -> Result<&mut Watch, String> {
        let name = stream_name(step)?;
        self.streams
            .get_mut(&name)
            .ok_or_else(|| format!("no stream {name:?} is open"))
    }

    /// Checks a step's outcome against its expectations and saves variables.
    fn judge(&mut self, step: &Map<String, Value>, outcome: Outcome) -> Result<(), String> {
        let expected_error = step.get("expect_error").and_then(Value::as_str);
        let response = match (outcome, expected_error) {
            (Outcome::Status { code, message }, Some(want)) => {
                if code != want {
                    return Err(format!("expected {want}, got {code}: {message}"));
                }
                if let Some(part) = step.get("expect_error_contains").and_then(Value::as_str) {
                    if !message.contains(part) {
                        return Err(format!(
                            "the {code} message {message:?} does not contain {part:?}"
                        ));
                    }
                }
                return Ok(());
            }
            (Outcome::Status { code, message }, None) => {
                return Err(format!("failed with {code}: {message}"))
            }
            (Outcome::Response(r), Some(want)) => {
                return Err(format!("expected {want}, got a response: {r}"))
            }
            (Outcome::Response(r), None) => r,
        };
        if let Some(epoch) = response.get("epoch").and_then(Value::as_u64) {
            if epoch != 0 {
                self.vars.insert("epoch".into(), Value::from(epoch));
            }
        }
        if let Some(expect) = step.get("expect") {
            matches(expect, &response, "response")?;
        }
        if let Some(save) = step.get("save") {
            let save = save.as_object().ok_or("\"save\" is an object")?;
            for (name, field) in save {
                let field = field.as_str().ok_or("\"save\" names response fields")?;
                let value = field
                    .split('.')
                    .try_fold(&response, |v, part| match part.parse::<usize>() {
                        Ok(i) => v.get(i),
                        Err(_) => v.get(part),
                    })
                    .ok_or_else(|| {
                        format!("cannot save {field:?}: not in the response {response}")
                    })?;
                self.vars.insert(name.clone(), value.clone());
            }
        }
        Ok(())
    }
}

fn stream_name(step: &Map<String, Value>) -> Result<String, String> {
    step.get("stream")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| "a watch step needs \"stream\"".to_owned())
}

/// Waits until the server answers (it says UNAVAILABLE until it is ready).
async fn wait_until_serving(client: &Client) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match client.stats().await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(format!("the server is not serving after 10 s: {e}"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Runs one scenario file; the error names the step.
async fn run_scenario(path: &Path) -> Result<usize, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let scenario: Value = serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))?;
    let steps = scenario
        .get("steps")
        .and_then(Value::as_array)
        .ok_or("a scenario needs \"steps\"")?;
    let server = RunningServer::start(config(scenario.get("server")))
        .await
        .map_err(|e| format!("the server did not start: {e}"))?;
    let client = Client::connect(server.url())
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    wait_until_serving(&client).await?;
    let mut runner = Runner {
        client,
        vars: HashMap::new(),
        streams: HashMap::new(),
    };
    for (i, raw) in steps.iter().enumerate() {
        let step = substitute(raw, &runner.vars).and_then(|s| {
            s.as_object()
                .cloned()
                .ok_or_else(|| "a step is an object".into())
        });
        let result = match step {
            Ok(step) => match runner.step(&step).await {
                Ok(outcome) => runner.judge(&step, outcome),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        result.map_err(|e| format!("step {i} {raw}: {e}"))?;
    }
    drop(runner);
    let _ = server.stop().await;
    Ok(steps.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_conformance_scenario_passes() {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(scenario_dir())
        .expect("tests/conformance exists")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    assert!(
        !paths.is_empty(),
        "no scenario in {}",
        scenario_dir().display()
    );
    let mut failures = Vec::new();
    for path in &paths {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        match run_scenario(path).await {
            Ok(steps) => println!("ok    {name} ({steps} steps)"),
            Err(e) => {
                println!("FAIL  {name}: {e}");
                failures.push(format!("{name}: {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} scenarios failed:\n{}",
        failures.len(),
        paths.len(),
        failures.join("\n")
    );
}

#[test]
fn subset_matching_follows_the_format() {
    let actual = serde_json::json!({"a": 1, "b": [{"x": 1, "y": 2}], "e": "FRESH"});
    assert!(matches(&serde_json::json!({"a": 1}), &actual, "r").is_ok());
    assert!(matches(&serde_json::json!({"b": [{"y": 2}]}), &actual, "r").is_ok());
    assert!(matches(&serde_json::json!({"b": []}), &actual, "r").is_err());
    assert!(matches(&serde_json::json!({"e": "STALE"}), &actual, "r").is_err());
    assert!(matches(&serde_json::json!({"z": 0}), &actual, "r").is_err());
    let mut vars = HashMap::new();
    vars.insert("v".to_owned(), Value::from(7));
    assert_eq!(
        substitute(&serde_json::json!({"version": "$v", "k": ["$v"]}), &vars).unwrap(),
        serde_json::json!({"version": 7, "k": [7]})
    );
    assert!(substitute(&serde_json::json!("$nope"), &vars).is_err());
    let step = serde_json::json!({"op": "publish", "changes": [{"key": "k", "critcal": true}]});
    let err = request::<pb::PublishRequest>(step.as_object().unwrap()).unwrap_err();
    assert!(err.contains("request.changes[0].critcal"), "{err}");
    let step =
        serde_json::json!({"op": "publish", "changes": [{"key": "k", "external_version": 3}]});
    assert!(request::<pb::PublishRequest>(step.as_object().unwrap()).is_ok());
}
