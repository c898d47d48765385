//! The real binary: `--log-format json` writes one JSON object per line, the
//! startup line names the HTTP address (ephemeral beside an ephemeral client
//! port), and the HTTP listener answers until SIGTERM stops the broker.

mod common;

use std::process::Stdio;

use common::http::{get, wait_ready};
use common::within;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

#[tokio::test]
async fn binary_serves_http_and_logs_json() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidings-broker"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "info")
        .env_remove("TIDINGS_CONFIG")
        .env_remove("TIDINGS_HTTP_LISTEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the broker binary starts");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let http = within("the listening line", async {
        loop {
            let mut line = String::new();
            assert!(
                stderr.read_line(&mut line).await.unwrap() > 0,
                "exited early"
            );
            let entry: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {line}"));
            assert!(entry["level"].is_string(), "{entry}");
            let message = entry["fields"]["message"].as_str().unwrap_or("");
            if message.starts_with("listening on ") {
                let url = entry["fields"]["http"].as_str().expect("http field");
                let addr = url
                    .trim_start_matches("http://")
                    .trim_end_matches('/')
                    .parse::<std::net::SocketAddr>()
                    .unwrap();
                assert_ne!(addr.port(), 8222, "an ephemeral port beside --listen :0");
                return addr;
            }
        }
    })
    .await;
    assert_eq!(get(http, "/healthz").await.status, 200);
    assert_eq!(wait_ready(http).await["ready"], true);
    let page = get(http, "/").await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("<title>tidings</title>"));
    assert!(page.header("content-security-policy").is_some());
    let script = get(http, "/assets/app.js").await;
    assert!(
        script
            .header("content-type")
            .unwrap()
            .starts_with("text/javascript")
    );
    assert_eq!(get(http, "/assets/nope.js").await.status, 404);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let exit = within("the broker to exit", child.wait()).await.unwrap();
    let mut rest = String::new();
    within("the log", stderr.read_to_string(&mut rest))
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0), "log:\n{rest}");
    assert!(rest.contains("HTTP listener stopped"), "log:\n{rest}");
    assert!(tokio::net::TcpStream::connect(http).await.is_err());
}
