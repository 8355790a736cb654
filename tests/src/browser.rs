//! The report's browser check: opens a report in headless Chromium over the
//! DevTools protocol and measures, on a screenshot of the whole page, that
//! every chart drew something, and that the page logged no error and fetched
//! nothing from elsewhere.
//!
//! Pixels rather than the SVG source, because well-formed SVG can still
//! render nothing (points outside the view box, NaN coordinates, a zero-size
//! element), and only the rendered page shows it. The screenshot is kept so a
//! person can look at what was measured.

use std::{
    collections::{BTreeMap, HashMap},
    ffi::OsStr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use base64::Engine as _;
use serde_json::{Value, json};

mod cdp;

use cdp::{CdpEvent, Chromium};

/// The viewport's width: wide enough for a ~900 px chart plus margins. The
/// height is grown to the page's before the screenshot.
const VIEWPORT_WIDTH: u32 = 1280;
const VIEWPORT_HEIGHT: u32 = 900;
/// Taller screenshots than this hit Chromium's texture limits.
const MAX_PAGE_HEIGHT: u32 = 16_000;
/// Per DevTools call. Generous: the e2e tests share two cores with a lab.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// A colour counts towards [`ChartPixels::colours`] when it covers at least
/// this share of a chart's area, so the shades anti-aliasing adds along lines
/// and text don't.
const COLOUR_MIN_SHARE: f64 = 0.001;
/// A pixel counts towards [`ChartPixels::coloured_fraction`] when its
/// channels spread at least this far apart: the charts' series colours do
/// (plotters' palette: 65 and up), greys and the pale tints of shaded bands
/// (about 10) do not.
const SATURATED_MIN_SPREAD: u8 = 48;

/// What the browser showed of one chart.
#[derive(Debug, Clone, PartialEq)]
pub struct ChartPixels {
    /// The figure's id (`chart-<signal key>`).
    pub id: String,
    /// The size of the figure's `<svg>` on screen, in CSS pixels; 0×0 when
    /// the figure has no `<svg>` or it is not displayed.
    pub width: u32,
    pub height: u32,
    /// Share of the svg's pixels that differ from its most common colour
    /// (its background): 0 for a chart that drew nothing. Shaded bands,
    /// grid, axes and text count too.
    pub ink_fraction: f64,
    /// Share of the svg's pixels in a clearly saturated colour: the data
    /// series (and event markers), not the greys and pale tints of
    /// backgrounds, bands, grid, axes and text. About 0 for a chart whose
    /// frame is drawn but whose series are not.
    pub coloured_fraction: f64,
    /// Distinct colours other than the background, each covering at least
    /// 0.1 % of the chart.
    pub colours: usize,
    /// The background (`#rrggbb`; empty when the chart has no pixels).
    pub background: String,
    /// Those colours (`#rrggbb`) with the share of the chart each covers,
    /// most first: to check that a given series' colour is there.
    pub palette: Vec<(String, f64)>,
}

/// What opening a report in Chromium showed.
#[derive(Debug, Clone)]
pub struct BrowserCheck {
    /// Every `figure.chart`, in page order.
    pub charts: Vec<ChartPixels>,
    /// Errors, in the order they happened: `console.error`/`console.assert`,
    /// uncaught exceptions, the browser's own error log entries (failed
    /// loads, blocked content) and failed requests.
    pub console_errors: Vec<String>,
    /// Every console message and log entry whatever its level, to show next
    /// to a failed assertion.
    pub console_messages: Vec<String>,
    /// URLs the page requested besides itself (`data:` URLs aside): a
    /// self-contained report requests none.
    pub requests: Vec<String>,
    /// The whole page as a PNG, in the caller's `out_dir`.
    pub screenshot: PathBuf,
}

impl BrowserCheck {
    /// The chart with this figure id.
    pub fn chart(&self, id: &str) -> Option<&ChartPixels> {
        self.charts.iter().find(|chart| chart.id == id)
    }
}

/// Opens `html` in headless Chromium, saves a screenshot of the whole page
/// to `out_dir/<file stem>.png` (Chromium's stderr next to it, as
/// `<file stem>.chromium.log`) and measures every `figure.chart`.
pub fn check_report(html: &Path, out_dir: &Path) -> anyhow::Result<BrowserCheck> {
    let binary = find_chromium(std::env::var_os("PATH").as_deref())?;
    let html = html
        .canonicalize()
        .with_context(|| format!("opening {}", html.display()))?;
    let url = url::Url::from_file_path(&html)
        .map_err(|()| anyhow::anyhow!("{} has no file:// URL", html.display()))?
        .to_string();
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let stem = html
        .file_stem()
        .unwrap_or(OsStr::new("report"))
        .to_string_lossy();
    let screenshot = out_dir.join(format!("{stem}.png"));
    let stderr_log = out_dir.join(format!("{stem}.chromium.log"));

    let mut browser = Chromium::launch(&binary, &chromium_args(), &stderr_log, CALL_TIMEOUT)?;
    let page = open_page(&mut browser)?;
    // Load events tell which navigation they belong to by its loader id.
    let navigation = page.call(&mut browser, "Page.navigate", json!({ "url": url }))?;
    if let Some(error) = navigation.get("errorText").and_then(Value::as_str) {
        anyhow::bail!("Chromium could not open {url}: {error}");
    }
    let loader = navigation
        .get("loaderId")
        .cloned()
        .context("Page.navigate returned no loader id")?;
    browser.wait_for_event(&page.session, "Page.lifecycleEvent", |params| {
        params.get("name").and_then(Value::as_str) == Some("load")
            && params.get("loaderId") == Some(&loader)
    })?;
    // Text is drawn once its fonts are in; all of them are local here.
    page.evaluate(&mut browser, "document.fonts.ready.then(() => true)")?;

    // A viewport as tall as the page, so one viewport screenshot holds it
    // all and element boxes are in screenshot coordinates.
    let page_height = page
        .evaluate(
            &mut browser,
            "Math.ceil(document.documentElement.scrollHeight)",
        )?
        .as_u64()
        .context("reading the page's height")?;
    anyhow::ensure!(
        page_height <= u64::from(MAX_PAGE_HEIGHT),
        "the page is {page_height} px tall; the check screenshots at most {MAX_PAGE_HEIGHT} px"
    );
    page.set_viewport(&mut browser, page_height.max(u64::from(VIEWPORT_HEIGHT)))?;

    let boxes: Vec<ChartBox> = serde_json::from_value(page.evaluate(&mut browser, CHART_BOXES_JS)?)
        .context("reading the charts' boxes")?;
    let shot = page.call(
        &mut browser,
        "Page.captureScreenshot",
        json!({ "format": "png", "fromSurface": true }),
    )?;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot.get("data").and_then(Value::as_str).unwrap_or_default())
        .context("decoding the screenshot's base64")?;
    std::fs::write(&screenshot, &png)
        .with_context(|| format!("writing {}", screenshot.display()))?;
    let image = Screenshot::decode(&png)?;
    let scale = f64::from(image.width) / f64::from(VIEWPORT_WIDTH);
    let charts = boxes.iter().map(|b| measure(&image, b, scale)).collect();

    // The page's events come in order on the pipe: once a last round trip
    // to the page is back, every event before it has been read.
    page.evaluate(&mut browser, "0")?;
    let seen = Seen::from_events(&browser.events, &page.session, &loader);
    anyhow::ensure!(
        !seen.crashed,
        "the page crashed in Chromium; see {}",
        stderr_log.display()
    );
    Ok(BrowserCheck {
        charts,
        console_errors: seen.errors,
        console_messages: seen.messages,
        requests: seen.requests,
        screenshot,
    })
}

/// Chromium's flags for a reproducible, quiet, headless run.
fn chromium_args() -> Vec<String> {
    [
        "--headless",
        // Chromium refuses to start as root with its sandbox, and containers
        // often lack the namespaces it needs; the page is our own file.
        "--no-sandbox",
        // Software rendering: CI machines have no GPU.
        "--disable-gpu",
        // Docker's /dev/shm is 64 MB, too small for a tall page.
        "--disable-dev-shm-usage",
        // The colours in the screenshot are the page's colours, and one CSS
        // pixel is one screenshot pixel.
        "--force-color-profile=srgb",
        "--force-device-scale-factor=1",
        // Scroll bars would cover the page's right edge.
        "--hide-scrollbars",
        // Nothing but the page touches the network, so a request seen is
        // the page's.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-extensions",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        "--mute-audio",
    ]
    .iter()
    .map(|arg| arg.to_string())
    .chain([format!("--window-size={VIEWPORT_WIDTH},{VIEWPORT_HEIGHT}")])
    .collect()
}

/// A page (tab) in the browser, attached in flat mode: its commands and
/// events carry its session id.
struct PageSession {
    session: String,
}

fn open_page(browser: &mut Chromium) -> anyhow::Result<PageSession> {
    let target = browser.call(None, "Target.createTarget", json!({ "url": "about:blank" }))?;
    let target_id = target
        .get("targetId")
        .and_then(Value::as_str)
        .context("Target.createTarget returned no target id")?;
    let attached = browser.call(
        None,
        "Target.attachToTarget",
        json!({ "targetId": target_id, "flatten": true }),
    )?;
    let page = PageSession {
        session: attached
            .get("sessionId")
            .and_then(Value::as_str)
            .context("Target.attachToTarget returned no session id")?
            .to_string(),
    };
    for domain in ["Page", "Runtime", "Log", "Network"] {
        page.call(browser, &format!("{domain}.enable"), json!({}))?;
    }
    page.call(
        browser,
        "Page.setLifecycleEventsEnabled",
        json!({ "enabled": true }),
    )?;
    page.set_viewport(browser, u64::from(VIEWPORT_HEIGHT))?;
    Ok(page)
}

impl PageSession {
    fn call(&self, browser: &mut Chromium, method: &str, params: Value) -> anyhow::Result<Value> {
        browser.call(Some(&self.session), method, params)
    }

    /// Runs `expression` in the page (awaiting it when it is a promise) and
    /// returns its value as JSON.
    fn evaluate(&self, browser: &mut Chromium, expression: &str) -> anyhow::Result<Value> {
        let evaluated = self.call(
            browser,
            "Runtime.evaluate",
            json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
        )?;
        if let Some(exception) = evaluated.get("exceptionDetails") {
            anyhow::bail!("evaluating {expression:?} in the page threw: {exception}");
        }
        Ok(evaluated
            .pointer("/result/value")
            .cloned()
            .unwrap_or(Value::Null))
    }

    fn set_viewport(&self, browser: &mut Chromium, height: u64) -> anyhow::Result<()> {
        self.call(
            browser,
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": VIEWPORT_WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        )
        .map(drop)
    }
}

/// Finds Chromium on `path` (a `PATH` value): Debian names it `chromium`,
/// Ubuntu's older packages `chromium-browser`.
pub fn find_chromium(path: Option<&OsStr>) -> anyhow::Result<PathBuf> {
    const NAMES: [&str; 2] = ["chromium", "chromium-browser"];
    path.into_iter()
        .flat_map(std::env::split_paths)
        .flat_map(|dir| NAMES.map(|name| dir.join(name)))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no Chromium on PATH (looked for {}); the report's browser check needs \
                 Debian's `chromium` package: run scripts/install-deps.sh",
                NAMES.join(", ")
            )
        })
}

/// Each chart's `<svg>` box in page coordinates (the viewport is the page's
/// size, so they are also the screenshot's).
const CHART_BOXES_JS: &str = r#"
  Array.from(document.querySelectorAll("figure.chart"), (figure) => {
    const svg = figure.querySelector("svg");
    const box = svg ? svg.getBoundingClientRect() : { x: 0, y: 0, width: 0, height: 0 };
    return { id: figure.id, x: box.x + window.scrollX, y: box.y + window.scrollY,
             width: box.width, height: box.height };
  })"#;

#[derive(Debug, serde::Deserialize)]
struct ChartBox {
    id: String,
    x: f64,
    y: f64,
    width: f64,
    height: f64,
}

/// A decoded screenshot, 8-bit RGB.
struct Screenshot {
    width: u32,
    height: u32,
    pixels: Vec<[u8; 3]>,
}

impl Screenshot {
    fn decode(png_bytes: &[u8]) -> anyhow::Result<Screenshot> {
        let mut decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
        decoder.set_transformations(png::Transformations::normalize_to_color8());
        let mut reader = decoder
            .read_info()
            .context("reading the screenshot's PNG header")?;
        let size = reader
            .output_buffer_size()
            .context("the screenshot is too large to decode")?;
        let mut buffer = vec![0; size];
        let frame = reader
            .next_frame(&mut buffer)
            .context("decoding the screenshot")?;
        let channels = frame.color_type.samples();
        anyhow::ensure!(
            channels >= 3,
            "the screenshot is {:?}, not colour",
            frame.color_type
        );
        let pixels = buffer[..frame.buffer_size()]
            .chunks_exact(channels)
            .map(|pixel| [pixel[0], pixel[1], pixel[2]])
            .collect();
        Ok(Screenshot {
            width: frame.width,
            height: frame.height,
            pixels,
        })
    }
}

/// Counts a chart's pixels. Only whole pixels inside its box count, so a
/// neighbour's edge cannot pass for ink.
fn measure(image: &Screenshot, chart: &ChartBox, scale: f64) -> ChartPixels {
    let inner = |start: f64, length: f64, limit: u32| {
        let first = (start * scale).ceil().clamp(0.0, f64::from(limit)) as u32;
        let end = ((start + length) * scale)
            .floor()
            .clamp(0.0, f64::from(limit)) as u32;
        first..end.max(first)
    };
    let columns = inner(chart.x, chart.width, image.width);
    let rows = inner(chart.y, chart.height, image.height);
    let mut counts: HashMap<[u8; 3], u64> = HashMap::new();
    for row in rows {
        let line = row as usize * image.width as usize;
        for column in columns.clone() {
            *counts
                .entry(image.pixels[line + column as usize])
                .or_default() += 1;
        }
    }
    let total: u64 = counts.values().sum();
    let mut by_count: Vec<([u8; 3], u64)> = counts.into_iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let background = by_count.first().copied();
    let background_count = background.map_or(0, |(_, count)| count);
    let ink = total - background_count;
    let saturated: u64 = by_count
        .iter()
        .filter(|(colour, _)| is_saturated(*colour))
        .map(|(_, count)| count)
        .sum();
    let share = |count: u64| {
        if total == 0 {
            0.0
        } else {
            count as f64 / total as f64
        }
    };
    let palette: Vec<(String, f64)> = by_count
        .iter()
        .skip(1)
        .take_while(|(_, count)| share(*count) >= COLOUR_MIN_SHARE)
        .map(|(colour, count)| (hex(*colour), share(*count)))
        .collect();
    ChartPixels {
        id: chart.id.clone(),
        width: chart.width.round() as u32,
        height: chart.height.round() as u32,
        ink_fraction: share(ink),
        coloured_fraction: share(saturated),
        colours: palette.len(),
        background: background
            .map(|(colour, _)| hex(colour))
            .unwrap_or_default(),
        palette,
    }
}

fn is_saturated(colour: [u8; 3]) -> bool {
    let (Some(high), Some(low)) = (colour.iter().max(), colour.iter().min()) else {
        return false;
    };
    high - low >= SATURATED_MIN_SPREAD
}

fn hex([red, green, blue]: [u8; 3]) -> String {
    format!("#{red:02x}{green:02x}{blue:02x}")
}

/// What the page reported, read from its DevTools events.
#[derive(Default)]
struct Seen {
    errors: Vec<String>,
    messages: Vec<String>,
    requests: Vec<String>,
    crashed: bool,
}

impl Seen {
    /// `navigation` is the page load's loader id, which is also the id of
    /// the request for the page itself.
    fn from_events(events: &[CdpEvent], session: &str, navigation: &Value) -> Seen {
        let mut seen = Seen::default();
        // Request id → URL, to name the URL of a failed request.
        let mut request_urls: BTreeMap<&str, &str> = BTreeMap::new();
        let text = |value: &Value, pointer: &str| {
            value
                .pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        for event in events
            .iter()
            .filter(|e| e.session.as_deref() == Some(session))
        {
            let params = &event.params;
            match event.method.as_str() {
                "Runtime.consoleAPICalled" => {
                    let kind = text(params, "/type");
                    let args = params.get("args").and_then(Value::as_array);
                    let words: Vec<String> = args.into_iter().flatten().map(describe).collect();
                    let line = format!("console.{kind}: {}", words.join(" "));
                    if kind == "error" || kind == "assert" {
                        seen.errors.push(line.clone());
                    }
                    seen.messages.push(line);
                }
                "Runtime.exceptionThrown" => {
                    let details = params.get("exceptionDetails").unwrap_or(&Value::Null);
                    let what = match details.get("exception") {
                        Some(exception) => describe(exception),
                        None => text(details, "/text"),
                    };
                    let line = format!(
                        "uncaught exception at {}:{}: {what}",
                        text(details, "/url"),
                        details
                            .get("lineNumber")
                            .and_then(Value::as_u64)
                            .unwrap_or(0)
                            + 1
                    );
                    seen.errors.push(line.clone());
                    seen.messages.push(line);
                }
                "Log.entryAdded" => {
                    let level = text(params, "/entry/level");
                    let url = text(params, "/entry/url");
                    let mut line = format!("log {level}: {}", text(params, "/entry/text"));
                    if !url.is_empty() {
                        line.push_str(&format!(" ({url})"));
                    }
                    if level == "error" {
                        seen.errors.push(line.clone());
                    }
                    seen.messages.push(line);
                }
                "Network.requestWillBeSent" => {
                    let url = params.pointer("/request/url").and_then(Value::as_str);
                    let id = params.get("requestId").and_then(Value::as_str);
                    if let (Some(url), Some(id)) = (url, id) {
                        let the_page = params.get("requestId") == Some(navigation);
                        if !the_page && !url.starts_with("data:") {
                            seen.requests.push(url.to_string());
                        }
                        request_urls.insert(id, url);
                    }
                }
                "Network.loadingFailed" => {
                    let id = text(params, "/requestId");
                    let url = request_urls.get(id.as_str()).copied().unwrap_or("?");
                    seen.errors.push(format!(
                        "request failed: {url}: {}",
                        text(params, "/errorText")
                    ));
                }
                "Inspector.targetCrashed" => seen.crashed = true,
                _ => {}
            }
        }
        seen
    }
}

/// A console argument or exception as text: strings as they are, other
/// values as DevTools describes them.
fn describe(object: &Value) -> String {
    if let Some(text) = object.get("value").and_then(Value::as_str) {
        return text.to_string();
    }
    for field in ["description", "unserializableValue"] {
        if let Some(text) = object.get(field).and_then(Value::as_str) {
            return text.to_string();
        }
    }
    match object.get("value") {
        Some(value) => value.to_string(),
        None => object
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_chromium_names_the_package() {
        let empty = tempfile::tempdir().unwrap();
        let error = find_chromium(Some(empty.path().as_os_str())).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("`chromium` package"), "{message}");
        assert!(message.contains("scripts/install-deps.sh"), "{message}");
    }

    #[test]
    fn chromium_browser_is_found_too() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("chromium-browser");
        std::fs::write(&binary, "").unwrap();
        assert_eq!(find_chromium(Some(dir.path().as_os_str())).unwrap(), binary);
    }
}
