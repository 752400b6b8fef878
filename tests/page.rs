//! The live site page in a real browser: Debian's chromium, headless, driven through
//! WebDriver (chromium-driver) against `ems run sites/demo.yaml --simulate`. The page loads
//! with no console errors, shows all ten units with the values `/api/v1/status` has, follows
//! a change within 2 s, and fits a phone's 390 px without scrolling sideways. Screenshots go
//! to the test's artifacts.

#![cfg(feature = "sim")]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const TOKEN: &str = "page-test-token";

/// A child process killed when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ems run sites/demo.yaml --simulate` on a free port; its base URL.
fn start_ems() -> (Killed, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ems"))
        .args([
            "run",
            "sites/demo.yaml",
            "--simulate",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("EMS_DR_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ems starts");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    let mut reader = BufReader::new(stdout);
    while !line.contains("api listening on") {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "ems ended before listening"
        );
    }
    let base = line.trim().rsplit(' ').next().unwrap().to_string();
    (Killed(child), base)
}

/// chromedriver on a free port; its URL once it answers.
async fn start_driver() -> (Killed, String) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (apt-get install chromium-driver; tests/run installs it)");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = reqwest::get(format!("{url}/status"))
            .await
            .ok()
            .map(|r| r.status().is_success())
            .unwrap_or(false);
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (Killed(child), url)
}

async fn browser(driver: &str, width: u32) -> Client {
    site_ems::tls_ready();
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     format!("--window-size={width},900")],
        }),
    );
    caps.insert("goog:loggingPrefs".into(), json!({ "browser": "ALL" }));
    ClientBuilder::rustls()
        .unwrap()
        .capabilities(caps)
        .connect(driver)
        .await
        .expect("a browser session")
}

/// The browser's console, as chromedriver keeps it.
#[derive(Debug)]
struct BrowserLog;

impl fantoccini::wd::WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }
    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(json!({ "type": "browser" }).to_string()),
        )
    }
}

async fn status(base: &str) -> Value {
    reqwest::get(format!("{base}/api/v1/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The text of `[data-field=field]` in the unit row `unit`.
async fn unit_field(c: &Client, unit: &str, field: &str) -> String {
    c.find(Locator::Css(&format!(
        "tr[data-unit='{unit}'] [data-field='{field}']"
    )))
    .await
    .unwrap()
    .text()
    .await
    .unwrap()
}

fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("page-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_shows_the_site_as_status_has_it_on_a_phone() {
    let (_ems, base) = start_ems();
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("{base}/api/v1/status"))
        .await
        .map(|r| !r.status().is_success())
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "no status from the EMS");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_driver, driver) = start_driver().await;
    let c = browser(&driver, 390).await;
    c.goto(&format!("{base}/")).await.unwrap();

    // All ten units, rendered from the status.
    let deadline = Instant::now() + Duration::from_secs(10);
    let rows = loop {
        let rows = c.find_all(Locator::Css("tr[data-unit]")).await.unwrap();
        if rows.len() == 10 || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(rows.len(), 10, "ten units on the page");
    let s = status(&base).await;
    for inv in s["inverters"].as_array().unwrap() {
        let id = inv["id"].as_str().unwrap();
        assert_eq!(
            unit_field(&c, id, "health").await,
            inv["health"].as_str().unwrap(),
            "{id}"
        );
        let soc: f64 = unit_field(&c, id, "soc").await.parse().unwrap();
        let want = inv["soc_pct"].as_f64().unwrap();
        assert!(
            (soc - want).abs() < 0.5,
            "{id}: SOC {soc} on the page, {want} in status"
        );
        let bat = unit_field(&c, id, "battery").await;
        assert!(bat.contains(" / "), "{id}: setpoint / measured: {bat}");
    }
    assert_eq!(
        c.find(Locator::Id("site"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        s["site"].as_str().unwrap()
    );

    // A phone's width: nothing wider than the screen.
    let fits = c
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(fits, json!(true), "horizontal scroll at 390 px");
    std::fs::write(
        artifacts().join("page-390.png"),
        c.screenshot().await.unwrap(),
    )
    .unwrap();

    // A change shows within 2 s: a demand-response event in force from now.
    let now = chrono::DateTime::parse_from_rfc3339(s["time"].as_str().unwrap()).unwrap();
    let event = json!({
        "id": "page-test",
        "start": (now - chrono::Duration::minutes(1)).to_rfc3339(),
        "end": (now + chrono::Duration::hours(1)).to_rfc3339(),
        "export_limit_w": 0
    });
    let posted = reqwest::Client::new()
        .post(format!("{base}/api/v1/dr/events"))
        .bearer_auth(TOKEN)
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 201);
    let changed = Instant::now();
    let shown = loop {
        let dr = c
            .find(Locator::Id("dr"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if dr.contains("page-test") {
            break changed.elapsed();
        }
        assert!(
            changed.elapsed() < Duration::from_secs(5),
            "the page never showed the event: {dr}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "the page showed the event {:.2} s after it was accepted",
        shown.as_secs_f64()
    );
    assert!(shown <= Duration::from_secs(2), "followed after {shown:?}");
    std::fs::write(
        artifacts().join("page-390-dr.png"),
        c.screenshot().await.unwrap(),
    )
    .unwrap();

    // No console errors all along.
    let log = c.issue_cmd(BrowserLog).await.unwrap();
    let errors: Vec<&Value> = log
        .as_array()
        .map(|a| a.iter().filter(|e| e["level"] == "SEVERE").collect())
        .unwrap_or_default();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    c.close().await.unwrap();
}
