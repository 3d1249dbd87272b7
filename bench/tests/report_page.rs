//! `imbench report` end to end: the built binary turns real-shaped imbench
//! JSON (tests/fixtures) into `index.html`, twice (the history grows, a
//! truncated history line is skipped), and a real headless Chromium opens
//! the page: it loads, it is not blank, and every chart the report says it
//! wrote is there.
//!
//! Without /usr/bin/chromium the browser part is skipped with a message,
//! unless IM_REQUIRE_CHROMIUM=1 (CI), which makes that a failure.

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

const CHROMIUM: &str = "/usr/bin/chromium";
/// One browser run (a screenshot or a DOM dump) takes 1-2 s here.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(60);
const WINDOW: (u32, u32) = (1280, 4000);

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 4, "fixtures: {files:?}");
    files
}

fn report(out: &Path, commit: &str, inputs: &[PathBuf]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_imbench"))
        .arg("report")
        .arg("--out")
        .arg(out)
        .args(["--commit", commit])
        .args(inputs)
        .output()
        .expect("run imbench")
}

/// `wrote DIR/index.html: N charts (...)` -> N.
fn charts_written(stdout: &str) -> usize {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("wrote "))
        .unwrap_or_else(|| panic!("no `wrote` line in {stdout:?}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "charts").expect("N charts");
    words[at - 1].parse().expect("a chart count")
}

fn work_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_report_page_loads_in_chromium_with_every_chart() {
    let work = work_dir("report_page");
    let out = work.join("report");
    let inputs = fixtures();

    let first = report(&out, "aaa1111", &inputs);
    assert!(first.status.success(), "{first:?}");
    let first_charts = charts_written(&String::from_utf8_lossy(&first.stdout));

    // A report cut off while appending left half a line.
    let history = out.join("history.jsonl");
    let mut text = std::fs::read_to_string(&history).unwrap();
    assert_eq!(text.lines().count(), inputs.len());
    text.push_str("{\"commit\": \"cut\", \"time\": \"2026-");
    std::fs::write(&history, text).unwrap();

    let second = report(&out, "bbb2222", &inputs);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{second:?}");
    assert!(
        stderr.contains("truncated"),
        "the skipped line is reported: {stderr}"
    );
    let stdout = String::from_utf8_lossy(&second.stdout);
    let charts = charts_written(&stdout);
    assert_eq!(charts, first_charts, "the same runs, the same charts");
    assert!(
        stdout.contains(&format!("({} records)", 2 * inputs.len())),
        "{stdout}"
    );
    // 4 runs: a ratio chart each, latency for 3 (chaos has none), a history
    // chart per benchmark, and storage's timeline phases.
    assert!(charts > 4 + 3 + 4, "{stdout}");

    let index = out.join("index.html");
    let html = std::fs::read_to_string(&index).unwrap();
    assert!(html.contains(&format!(
        "<meta name=\"imbench-charts\" content=\"{charts}\">"
    )));
    assert_eq!(html.matches("<svg").count(), charts);
    assert!(
        html.contains("bbb2222") && html.contains(">FAIL<"),
        "e2e's 0.402 misses 0.5"
    );

    let Some(chromium) = chromium() else { return };
    let url = format!("file://{}", index.display()).replace(' ', "%20");

    let shot = work.join("screenshot.png");
    let window = format!("--window-size={},{}", WINDOW.0, WINDOW.1);
    let ran = browser(
        &chromium,
        &[&format!("--screenshot={}", shot.display()), &window, &url],
    );
    assert!(ran.status.success(), "chromium --screenshot: {ran:?}");
    assert!(shot.exists(), "no screenshot: the page did not load");
    println!("screenshot: {}", shot.display());
    not_blank(&shot);

    let dom = browser(&chromium, &["--dump-dom", &window, &url]);
    assert!(dom.status.success(), "chromium --dump-dom: {dom:?}");
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains("imbench report"),
        "the page's DOM: {}",
        &dom[..dom.len().min(500)]
    );
    assert_eq!(
        dom.matches("<svg").count(),
        charts,
        "every chart is in the DOM"
    );
    assert_eq!(dom.matches("<figure class=\"chart\"").count(), charts);
    for img in dom.split("<img").skip(1) {
        let src = img
            .split("src=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or_default();
        assert!(
            !src.is_empty() && out.join(src).exists(),
            "a broken <img>: {src:?}"
        );
    }
}

#[test]
fn a_bad_input_is_refused_by_name_before_anything_is_written() {
    let work = work_dir("report_bad_input");
    let bad = work.join("storage.json");
    std::fs::write(&bad, "{\"bench\": \"storage\", \"append\": []}").unwrap();
    let out = work.join("report");
    let mut inputs = fixtures();
    inputs.push(bad.clone());
    let run = report(&out, "c1", &inputs);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(stderr.contains(&bad.display().to_string()), "{stderr}");
    assert!(stderr.contains("no \"ratios\""), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out.join("history.jsonl").exists() && !out.join("index.html").exists());

    std::fs::write(&bad, "not json").unwrap();
    let run = report(&out, "c1", std::slice::from_ref(&bad));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        !run.status.success() && stderr.contains("not valid JSON"),
        "{stderr}"
    );
}

/// The browser, or `None` (the check is skipped) where it is not installed
/// and IM_REQUIRE_CHROMIUM is not 1.
fn chromium() -> Option<PathBuf> {
    if Path::new(CHROMIUM).exists() {
        return Some(PathBuf::from(CHROMIUM));
    }
    if std::env::var("IM_REQUIRE_CHROMIUM").as_deref() == Ok("1") {
        panic!("{CHROMIUM} is missing and IM_REQUIRE_CHROMIUM=1: install it (apt-get install chromium)");
    }
    eprintln!(
        "SKIPPED the browser check of the report page: {CHROMIUM} is missing \
         (apt-get install chromium; IM_REQUIRE_CHROMIUM=1 makes this a failure)"
    );
    None
}

/// Run headless Chromium with a fresh profile; killed after
/// [`BROWSER_TIMEOUT`].
fn browser(chromium: &Path, args: &[&str]) -> Output {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    // Read both pipes meanwhile, so a large DOM cannot fill one and stall it.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > BROWSER_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium {args:?} did not finish within {BROWSER_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// The screenshot shows a page: a good share of its pixels differ from
/// the background, in several colours (the charts' greens, reds, blues and
/// oranges, not only text).
fn not_blank(png_path: &Path) {
    let file = std::io::BufReader::new(std::fs::File::open(png_path).unwrap());
    let mut decoder = png::Decoder::new(file);
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected screenshot colour type {other:?}"),
    };
    assert_eq!((info.width, info.height), WINDOW);
    let pixels: Vec<[u8; 3]> = buf[..info.line_size * info.height as usize]
        .chunks_exact(channels)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    let background = pixels[0];
    let differs = |p: &[u8; 3]| (0..3).any(|c| p[c].abs_diff(background[c]) > 24);
    let inked = pixels.iter().filter(|p| differs(p)).count() as f64 / pixels.len() as f64;
    let saturated = pixels
        .iter()
        .filter(|p| p.iter().max().unwrap() - p.iter().min().unwrap() > 80)
        .count() as f64
        / pixels.len() as f64;
    let mut colours = std::collections::HashMap::new();
    for p in &pixels {
        *colours
            .entry([p[0] >> 4, p[1] >> 4, p[2] >> 4])
            .or_insert(0usize) += 1;
    }
    let distinct = colours.values().filter(|n| **n >= 50).count();
    println!(
        "screenshot: {:.1}% of pixels differ from the background, {:.2}% saturated, {distinct} distinct colours",
        inked * 100.0,
        saturated * 100.0
    );
    assert!(
        inked > 0.03,
        "the page looks blank: {:.2}% inked",
        inked * 100.0
    );
    assert!(
        saturated > 0.002,
        "no coloured charts: {:.3}% saturated",
        saturated * 100.0
    );
    assert!(distinct >= 8, "only {distinct} colours");
}
