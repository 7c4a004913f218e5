//! Latency by percentile, HdrHistogram style, as a standalone SVG: x is the percentile on a
//! log scale of 1/(1-p) (0%, 90%, 99%, … 99.999% evenly apart, so the tail gets as much room
//! as the body), y the latency in ms on a linear scale, one line per series, a legend.
//!
//! Written by hand (a few hundred bytes of markup per element) rather than through a plotting
//! crate: the picture is simple and the bench stays light.

use std::fmt::Write;

/// Decades of 1/(1-p) shown: up to 99.999%.
pub const DECADES: u32 = 5;

/// The drawing's size and the plot area within it (px).
const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 540.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;

/// Line colours (Tableau 10), reused in order beyond ten series.
const COLORS: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// One line: a name and its `[percentile, latency µs]` points (as in the JSON report).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Shown in the legend.
    pub name: String,
    /// `[percentile 0..=100, latency in µs]`, in increasing percentile.
    pub points: Vec<[f64; 2]>,
}

impl Series {
    /// The series of a `--json` report document (its `percentiles`).
    pub fn from_report_json(name: &str, json: &str) -> Result<Series, String> {
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
        let arr = v
            .get("percentiles")
            .and_then(|p| p.as_array())
            .ok_or("no \"percentiles\" array (a report of an older moltbot-bench?)")?;
        let mut points = Vec::with_capacity(arr.len());
        for pair in arr {
            let p = pair.get(0).and_then(|x| x.as_f64());
            let us = pair.get(1).and_then(|x| x.as_f64());
            match (p, us) {
                (Some(p), Some(us)) if (0.0..=100.0).contains(&p) && us >= 0.0 => {
                    points.push([p, us]);
                }
                _ => return Err(format!("bad percentile point {pair}")),
            }
        }
        if points.windows(2).any(|w| w[1][0] < w[0][0]) {
            return Err("percentiles out of order".into());
        }
        Ok(Series {
            name: name.to_string(),
            points,
        })
    }

    /// The latency (µs) at percentile `p`, if the series has that point.
    fn at(&self, p: f64) -> Option<f64> {
        self.points
            .iter()
            .find(|q| (q[0] - p).abs() < 1e-9)
            .map(|q| q[1])
    }
}

/// `NAME=FILE` of `--plot-add` and `moltbot-bench plot`.
pub fn parse_named(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((name, file)) if !name.is_empty() && !file.is_empty() => {
            Ok((name.to_string(), file.to_string()))
        }
        _ => Err(format!("{arg:?}: expected NAME=REPORT.json")),
    }
}

/// Position of percentile `p` in decades of 1/(1-p): 0 for 0%, 1 for 90%, 2 for 99%, …,
/// clamped to [0, DECADES] (the maximum, p = 100, sits at the right edge).
pub fn decades(p: f64) -> f64 {
    let rest = 1.0 - p / 100.0;
    if rest <= 0.0 {
        return f64::from(DECADES);
    }
    (-rest.log10()).clamp(0.0, f64::from(DECADES))
}

/// A 1, 2 or 5 × 10^k step giving at most about `ticks` intervals up to `max`.
pub fn nice_step(max: f64, ticks: u32) -> f64 {
    if !(max.is_finite() && max > 0.0) {
        return 1.0;
    }
    let raw = max / f64::from(ticks.max(1));
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * mag)
}

/// The labels of the decades 0 ..= [`DECADES`] (written out: computed ones would print
/// float noise such as 99.99900000000001).
pub const DECADE_LABELS: [&str; DECADES as usize + 1] =
    ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"];

/// Maps (percentile, µs) to drawing coordinates for a y axis from 0 to `y_top_ms`.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    /// The top of the y axis (ms).
    pub y_top_ms: f64,
}

impl Frame {
    /// x in px of percentile `p`.
    pub fn x(&self, p: f64) -> f64 {
        LEFT + decades(p) / f64::from(DECADES) * (WIDTH - LEFT - RIGHT)
    }

    /// y in px of a latency in µs.
    pub fn y(&self, us: f64) -> f64 {
        let h = HEIGHT - TOP - BOTTOM;
        TOP + h - (us / 1000.0 / self.y_top_ms).clamp(0.0, 1.0) * h
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters other than tab and newline are not allowed in XML 1.0.
            c if c.is_control() && c != '\t' && c != '\n' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// A latency in ms for labels: 3 significant digits at most.
fn fmt_ms(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else if ms >= 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.2}")
    }
}

/// The whole SVG document.
pub fn render_svg(title: &str, series: &[Series]) -> String {
    let max_us = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p[1]))
        .fold(0.0f64, f64::max);
    let step = nice_step(max_us / 1000.0, 6);
    let y_top_ms = ((max_us / 1000.0 / step).ceil().max(1.0)) * step;
    let f = Frame { y_top_ms };
    let (x0, x1) = (LEFT, WIDTH - RIGHT);
    let (y0, y1) = (TOP, HEIGHT - BOTTOM);

    let mut s = String::new();
    let _ = writeln!(s, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text class="title" x="{}" y="28" text-anchor="middle" font-size="16">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );

    // Grid and ticks: one vertical line a decade, horizontal lines at the nice steps.
    let _ = writeln!(s, r##"<g class="grid" stroke="#dddddd" stroke-width="1">"##);
    for d in 0..=DECADES {
        let x = x0 + f64::from(d) / f64::from(DECADES) * (x1 - x0);
        let _ = writeln!(s, r#"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{y1}"/>"#);
    }
    let ticks = (y_top_ms / step).round() as u32;
    for i in 0..=ticks {
        let y = f.y(f64::from(i) * step * 1000.0);
        let _ = writeln!(s, r#"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}"/>"#);
    }
    let _ = writeln!(s, "</g>");
    let _ = writeln!(s, r#"<g class="x-labels" text-anchor="middle">"#);
    for d in 0..=DECADES {
        let x = x0 + f64::from(d) / f64::from(DECADES) * (x1 - x0);
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{:.1}">{}</text>"#,
            y1 + 18.0,
            DECADE_LABELS[d as usize]
        );
    }
    let _ = writeln!(s, "</g>");
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let _ = writeln!(s, r#"<g class="y-labels" text-anchor="end">"#);
    for i in 0..=ticks {
        let v = f64::from(i) * step;
        let y = f.y(v * 1000.0);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{v:.decimals$}</text>"#,
            x0 - 8.0,
            y + 4.0
        );
    }
    let _ = writeln!(s, "</g>");
    let _ = writeln!(
        s,
        r##"<rect x="{x0}" y="{y0}" width="{}" height="{}" fill="none" stroke="#333333"/>"##,
        x1 - x0,
        y1 - y0
    );
    let _ = writeln!(
        s,
        r#"<text class="x-title" x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        (x0 + x1) / 2.0,
        HEIGHT - 14.0
    );
    let _ = writeln!(
        s,
        r#"<text class="y-title" x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">latency (ms)</text>"#,
        (y0 + y1) / 2.0,
        (y0 + y1) / 2.0
    );

    // The lines.
    for (i, se) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut pts = String::new();
        for p in &se.points {
            let _ = write!(pts, "{:.1},{:.1} ", f.x(p[0]), f.y(p[1]));
        }
        let _ = writeln!(
            s,
            r#"<polyline class="series" fill="none" stroke="{color}" stroke-width="2" stroke-linejoin="round" points="{}"><title>{}</title></polyline>"#,
            pts.trim_end(),
            escape(&se.name)
        );
    }

    // The legend, top left where the curves are lowest: name, then p50 / p99 / p99.9 / max.
    let line_h = 18.0;
    let entries: Vec<String> = series
        .iter()
        .map(|se| {
            let figures: Vec<String> = [
                (50.0, "p50"),
                (99.0, "p99"),
                (99.9, "p99.9"),
                (100.0, "max"),
            ]
            .into_iter()
            .filter_map(|(p, label)| {
                se.at(p)
                    .map(|us| format!("{label} {}", fmt_ms(us / 1000.0)))
            })
            .collect();
            if figures.is_empty() {
                se.name.clone()
            } else {
                format!("{}: {} ms", se.name, figures.join(" · "))
            }
        })
        .collect();
    // About 7 px a character at font size 12, plus the colour sample.
    let longest = entries.iter().map(|e| e.chars().count()).max().unwrap_or(0);
    let width = (longest as f64 * 7.0 + 55.0).clamp(120.0, x1 - x0 - 20.0);
    let _ = writeln!(
        s,
        r##"<g class="legend"><rect x="{:.1}" y="{:.1}" width="{width:.1}" height="{:.1}" fill="white" fill-opacity="0.85" stroke="#bbbbbb"/>"##,
        x0 + 10.0,
        y0 + 10.0,
        series.len() as f64 * line_h + 10.0
    );
    for (i, entry) in entries.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let y = y0 + 10.0 + 5.0 + line_h * (i as f64 + 0.5);
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            x0 + 18.0,
            x0 + 42.0,
            x0 + 50.0,
            y + 4.0,
            escape(entry),
        );
    }
    let _ = writeln!(s, "</g>");
    let _ = writeln!(s, "</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::percentile_curve;
    use crate::stats::{new_histogram, record};
    use std::time::Duration;

    /// A minimal well-formedness check: tags balance and nest, attributes are quoted, text
    /// holds no raw `<` or bare `&`. Returns the element names in document order.
    fn check_xml(doc: &str) -> Vec<String> {
        let mut stack: Vec<String> = Vec::new();
        let mut names = Vec::new();
        let mut rest = doc;
        let mut roots = 0;
        while let Some(lt) = rest.find('<') {
            let text = &rest[..lt];
            check_text(text);
            assert!(
                !stack.is_empty() || text.trim().is_empty(),
                "text outside the root: {text:?}"
            );
            let after = &rest[lt + 1..];
            let gt = after.find('>').expect("unclosed tag");
            let tag = &after[..gt];
            rest = &after[gt + 1..];
            if let Some(pi) = tag.strip_prefix('?') {
                assert!(
                    pi.ends_with('?') && stack.is_empty() && names.is_empty(),
                    "{tag}"
                );
                continue;
            }
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(
                    stack.pop().as_deref(),
                    Some(name.trim()),
                    "mismatched </{name}>"
                );
                continue;
            }
            let self_closing = tag.ends_with('/');
            let body = tag.trim_end_matches('/');
            let name: String = body.chars().take_while(|c| !c.is_whitespace()).collect();
            assert!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
                "bad element name in <{tag}>"
            );
            check_attributes(&body[name.len()..]);
            if stack.is_empty() {
                roots += 1;
            }
            names.push(name.clone());
            if !self_closing {
                stack.push(name);
            }
        }
        check_text(rest);
        assert!(rest.trim().is_empty(), "text after the root");
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        assert_eq!(roots, 1, "one root element");
        names
    }

    fn check_text(t: &str) {
        let mut rest = t;
        while let Some(i) = rest.find('&') {
            let ent = &rest[i..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                    .iter()
                    .any(|e| ent.starts_with(e)),
                "bare & in {t:?}"
            );
            rest = &rest[i + 1..];
        }
        assert!(!t.contains('>'), "raw > in text {t:?}");
    }

    fn check_attributes(mut a: &str) {
        loop {
            a = a.trim_start();
            if a.is_empty() {
                return;
            }
            let eq = a
                .find('=')
                .unwrap_or_else(|| panic!("attribute without value: {a}"));
            let name = a[..eq].trim();
            assert!(
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-:".contains(c)),
                "bad attribute name {name:?}"
            );
            let v = &a[eq + 1..];
            assert!(v.starts_with('"'), "unquoted attribute {name}");
            let end = v[1..].find('"').expect("unterminated attribute") + 1;
            let value = &v[1..end];
            assert!(!value.contains('<'), "< in attribute {name}");
            check_text(value);
            a = &v[end + 1..];
        }
    }

    /// The `points` of every polyline, in order.
    fn polylines(doc: &str) -> Vec<Vec<(f64, f64)>> {
        doc.split("<polyline")
            .skip(1)
            .map(|p| {
                let pts = p.split("points=\"").nth(1).expect("points");
                let pts = &pts[..pts.find('"').expect("end of points")];
                pts.split_whitespace()
                    .map(|xy| {
                        let (x, y) = xy.split_once(',').expect("x,y");
                        (x.parse().expect("x"), y.parse().expect("y"))
                    })
                    .collect()
            })
            .collect()
    }

    fn histogram_series(name: &str, us: impl Iterator<Item = u64>) -> Series {
        let mut h = new_histogram();
        for v in us {
            record(&mut h, Duration::from_micros(v));
        }
        Series {
            name: name.to_string(),
            points: percentile_curve(&h),
        }
    }

    #[test]
    fn the_svg_is_well_formed_with_axes_a_line_per_series_and_a_legend() {
        let a = histogram_series("gateway", 1..=10_000);
        let b = histogram_series("nginx <&> \"quoted\"", (1..=10_000).map(|v| v * 2));
        let doc = render_svg("pinned: A & B", &[a, b]);
        let names = check_xml(&doc);
        assert_eq!(names[0], "svg");
        assert_eq!(names.iter().filter(|n| *n == "polyline").count(), 2);
        for label in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"] {
            assert!(doc.contains(&format!(">{label}</text>")), "no {label}");
        }
        assert!(doc.contains(">percentile</text>") && doc.contains(">latency (ms)</text>"));
        assert!(doc.contains("pinned: A &amp; B"));
        assert!(doc.contains("nginx &lt;&amp;&gt; &quot;quoted&quot;"));
        // The legend names both series with their figures.
        let legend = &doc[doc.find(r#"class="legend""#).expect("legend")..];
        assert!(legend.contains(">gateway: p50 5.00 · p99 9.90"), "{legend}");
        assert!(
            legend.contains("nginx &lt;&amp;&gt; &quot;quoted&quot;: p50 10.0"),
            "{legend}"
        );
        for line in polylines(&doc) {
            assert_eq!(line.len(), crate::report::curve_percentiles().len());
            assert!(line.windows(2).all(|w| w[0].0 <= w[1].0), "x not monotonic");
            // Latency grows with the percentile: y (downwards) never increases.
            assert!(line.windows(2).all(|w| w[0].1 >= w[1].1), "y not monotonic");
        }
    }

    #[test]
    fn values_map_onto_the_axes() {
        // 1..=9,000 µs: the maximum is 9 ms, so the y axis ends at 10 ms (steps of 2).
        let s = histogram_series("one", 1..=9_000);
        let doc = render_svg("t", std::slice::from_ref(&s));
        let line = &polylines(&doc)[0];
        let f = Frame { y_top_ms: 10.0 };
        let (w, h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
        for (i, &[p, us]) in s.points.iter().enumerate() {
            let (x, y) = line[i];
            assert!((x - f.x(p)).abs() <= 0.05, "p{p}: x {x}");
            assert!((y - f.y(us)).abs() <= 0.05, "p{p}: y {y}");
        }
        // The decades sit where the labels are; latency is linear from the bottom.
        assert_eq!(f.x(0.0), LEFT);
        assert!((f.x(90.0) - (LEFT + w / 5.0)).abs() < 1e-6);
        assert!((f.x(99.0) - (LEFT + 2.0 * w / 5.0)).abs() < 1e-6);
        assert!((f.x(99.999) - (LEFT + w)).abs() < 1e-6);
        assert_eq!(f.x(100.0), LEFT + w);
        assert_eq!(f.y(0.0), TOP + h);
        assert_eq!(f.y(5_000.0), TOP + h / 2.0);
        assert_eq!(f.y(10_000.0), TOP);
        // p99 of 1..=9,000 µs is 8.91 ms: 89.1% of the height, on the 99% gridline.
        let i99 = s.points.iter().position(|q| q[0] == 99.0).expect("p99");
        let (x, y) = line[i99];
        assert!((x - (LEFT + 2.0 * w / 5.0)).abs() <= 0.05, "{x}");
        assert!((y - (TOP + h * (1.0 - 0.891))).abs() <= 0.5, "{y}");
        for tick in ["0", "2", "4", "6", "8", "10"] {
            assert!(doc.contains(&format!(">{tick}</text>")), "no y tick {tick}");
        }
    }

    #[test]
    fn nice_steps_and_labels() {
        assert_eq!(nice_step(10.0, 6), 2.0);
        assert_eq!(nice_step(1.0, 5), 0.2);
        assert_eq!(nice_step(0.7, 6), 0.2);
        assert_eq!(nice_step(250.0, 5), 50.0);
        assert_eq!(nice_step(0.0, 5), 1.0);
        assert_eq!(nice_step(f64::NAN, 5), 1.0);
        // Each label sits at its decade.
        for (d, label) in DECADE_LABELS.iter().enumerate() {
            let p: f64 = label.trim_end_matches('%').parse().expect("number");
            assert!((decades(p) - d as f64).abs() < 1e-9, "{label}");
        }
        assert_eq!(decades(0.0), 0.0);
        assert_eq!(decades(100.0), 5.0);
        assert_eq!(decades(99.9999999), 5.0);
    }

    #[test]
    fn series_come_from_report_json() {
        let s = Series::from_report_json(
            "a",
            r#"{"rps": 1, "percentiles": [[0, 5.5], [50, 7], [100, 9]]}"#,
        )
        .expect("series");
        assert_eq!(s.points, vec![[0.0, 5.5], [50.0, 7.0], [100.0, 9.0]]);
        assert_eq!(s.at(50.0), Some(7.0));
        for bad in [
            "{}",
            "[",
            r#"{"percentiles": [[101, 1]]}"#,
            r#"{"percentiles": [[50, -1]]}"#,
            r#"{"percentiles": [[50]]}"#,
            r#"{"percentiles": [[50, 1], [40, 2]]}"#,
        ] {
            assert!(Series::from_report_json("a", bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_named("nginx=out/closed-nginx.json"),
            Ok(("nginx".into(), "out/closed-nginx.json".into()))
        );
        assert_eq!(parse_named("a=b=c"), Ok(("a".into(), "b=c".into())));
        for bad in ["nginx", "=x.json", "nginx="] {
            assert!(parse_named(bad).is_err(), "{bad}");
        }
    }
}
