//! A reader of the Prometheus text exposition format (version 0.0.4), just
//! enough for the sampler: sample lines with their labels and values, and
//! the names `# TYPE` lines declare (so "no line yet" can be told from "no
//! such metric"). `# HELP` lines, timestamps and exemplars are skipped.
//!
//! Written here rather than taken from a crate: the one published parser
//! splits labels on `,` and `=` and so misreads a label value holding
//! either (a route, an error text) or an escaped quote.

/// One sample line: `name{label="value",…} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Every sample of one scrape, in the order they came.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    /// Names declared by `# TYPE name kind` lines, in the order they came.
    pub declared: Vec<String>,
    /// Lines that were neither comments nor readable samples; skipped so
    /// one odd line costs one number, not the whole scrape.
    pub malformed: usize,
}

impl Exposition {
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for line in text.lines() {
            let line = line.trim_start_matches([' ', '\t']);
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_ascii_whitespace();
                if words.next() == Some("TYPE")
                    && let Some(name) = words.next()
                {
                    out.declared.push(name.to_string());
                }
                continue;
            }
            match parse_sample(line) {
                Some(sample) => out.samples.push(sample),
                None => out.malformed += 1,
            }
        }
        out
    }

    /// The first sample called `name`, whatever its labels.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.value)
    }

    /// Whether the scrape has the metric `name` at all: declared by a
    /// `# TYPE` line or with any sample. A labelled counter has no line for
    /// a label value until its first increment, but it is declared from the
    /// start; a metric that is neither (renamed, never registered) is not.
    pub fn has(&self, name: &str) -> bool {
        self.declared.iter().any(|d| d == name) || self.samples.iter().any(|s| s.name == name)
    }

    /// The sample called `name` whose label `label` is `value`.
    pub fn get_labelled(&self, name: &str, label: &str, value: &str) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.name == name && s.label(label) == Some(value))
            .map(|s| s.value)
    }

    /// `name_bucket` summed over every label but `le`: the cumulative
    /// count per upper bound, bounds ascending (`+Inf` last). Empty when
    /// the histogram has no series yet.
    pub fn histogram_buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        let mut sums: Vec<(f64, f64)> = Vec::new();
        for sample in self.samples.iter().filter(|s| s.name == bucket) {
            let Some(le) = sample.label("le").and_then(parse_value) else {
                continue;
            };
            match sums.iter_mut().find(|(bound, _)| *bound == le) {
                Some((_, count)) => *count += sample.value,
                None => sums.push((le, sample.value)),
            }
        }
        sums.sort_by(|a, b| a.0.total_cmp(&b.0));
        sums
    }
}

/// A sample value or `le` bound: Go's float syntax as Prometheus writes it,
/// including `NaN`, `+Inf` and `-Inf` (Rust's parser takes those too,
/// in any case).
fn parse_value(text: &str) -> Option<f64> {
    text.parse::<f64>().ok()
}

fn parse_sample(line: &str) -> Option<Sample> {
    let mut rest = line;
    let name_len = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(rest.len());
    let name = &rest[..name_len];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    rest = rest[name_len..].trim_start_matches([' ', '\t']);
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        rest = parse_labels(after_brace, &mut labels)?.trim_start_matches([' ', '\t']);
    }
    // What follows the value (a timestamp, an exemplar) is not needed.
    let value_text = rest.split([' ', '\t']).next()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value: parse_value(value_text)?,
    })
}

/// Reads `label="value",…}` (the opening brace already consumed) into
/// `labels`; returns what follows the closing brace.
fn parse_labels<'a>(mut rest: &'a str, labels: &mut Vec<(String, String)>) -> Option<&'a str> {
    loop {
        rest = rest.trim_start_matches([' ', '\t']);
        if let Some(after) = rest.strip_prefix('}') {
            return Some(after);
        }
        let key_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if key_len == 0 {
            return None;
        }
        let key = &rest[..key_len];
        rest = rest[key_len..].trim_start_matches([' ', '\t']);
        rest = rest.strip_prefix('=')?.trim_start_matches([' ', '\t']);
        rest = rest.strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()? {
                    (_, 'n') => value.push('\n'),
                    (_, '\\') => value.push('\\'),
                    (_, '"') => value.push('"'),
                    // Not an escape the format defines: keep it as written.
                    (_, other) => {
                        value.push('\\');
                        value.push(other);
                    }
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.to_string(), value));
        rest = rest[end + 1..].trim_start_matches([' ', '\t']);
        match rest.strip_prefix(',') {
            Some(after) => rest = after,
            None if rest.starts_with('}') => {}
            None => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_names_labels_and_values() {
        let text = "# HELP lab_x A help text with \"quotes\" and a } brace.\n\
                    # TYPE lab_x counter\n\
                    lab_x 42\n\
                    lab_y{route=\"/api/items/{id}\",status=\"200\"} 7\n\
                    \n\
                    lab_z{a=\"1\",} 1.5e3 1712345678000\n";
        let e = Exposition::parse(text);
        assert_eq!(e.malformed, 0);
        assert_eq!(e.samples.len(), 3);
        assert_eq!(e.get("lab_x"), Some(42.0));
        assert_eq!(
            e.get_labelled("lab_y", "route", "/api/items/{id}"),
            Some(7.0)
        );
        assert_eq!(e.samples[1].label("status"), Some("200"));
        assert_eq!(e.get("lab_z"), Some(1500.0), "trailing comma, timestamp");
        assert_eq!(e.get("lab_w"), None);
        assert_eq!(e.declared, ["lab_x"]);
    }

    #[test]
    fn a_metric_is_there_when_declared_or_sampled() {
        let text = "# HELP lab_jobs_total Jobs by outcome.\n\
                    # TYPE lab_jobs_total counter\n\
                    #  TYPE   lab_spaced gauge\n\
                    # HELP lab_helped_only Only a help line.\n\
                    lab_undeclared{a=\"1\"} 3\n";
        let e = Exposition::parse(text);
        assert_eq!(e.malformed, 0);
        assert!(e.has("lab_jobs_total"), "declared, no sample yet");
        assert_eq!(e.get_labelled("lab_jobs_total", "outcome", "done"), None);
        assert!(e.has("lab_spaced"), "extra blanks in the comment");
        assert!(e.has("lab_undeclared"), "a sample without a # TYPE line");
        assert!(!e.has("lab_helped_only"), "a # HELP line declares nothing");
        assert!(!e.has("lab_jobs"), "names match whole");
        assert!(!e.has("lab_renamed_total"));
    }

    #[test]
    fn label_values_may_hold_escapes_commas_equals_and_braces() {
        let text = r#"lab_e{msg="a \"quoted\" word, x=1 {b}\\n",path="C:\\dir\nnext"} 3"#;
        let e = Exposition::parse(text);
        assert_eq!(e.malformed, 0);
        let sample = &e.samples[0];
        assert_eq!(sample.label("msg"), Some("a \"quoted\" word, x=1 {b}\\n"));
        assert_eq!(sample.label("path"), Some("C:\\dir\nnext"));
        assert_eq!(sample.value, 3.0);
    }

    #[test]
    fn special_values() {
        let e = Exposition::parse("a NaN\nb +Inf\nc -Inf\nd -0.25\ne 1e-3\n");
        assert!(e.get("a").unwrap().is_nan());
        assert_eq!(e.get("b"), Some(f64::INFINITY));
        assert_eq!(e.get("c"), Some(f64::NEG_INFINITY));
        assert_eq!(e.get("d"), Some(-0.25));
        assert_eq!(e.get("e"), Some(0.001));
    }

    #[test]
    fn malformed_lines_are_skipped_alone() {
        let text = "good 1\n\
                    no_value\n\
                    bad_value abc\n\
                    unclosed{a=\"x\" 1\n\
                    unquoted{a=x} 1\n\
                    9starts_with_digit 1\n\
                    also_good{a=\"b\"} 2\n";
        let e = Exposition::parse(text);
        assert_eq!(e.malformed, 5);
        assert_eq!(e.get("good"), Some(1.0));
        assert_eq!(e.get("also_good"), Some(2.0));
    }

    #[test]
    fn histogram_buckets_are_summed_over_other_labels_and_sorted() {
        let text = "h_bucket{route=\"/b\",le=\"0.1\"} 1\n\
                    h_bucket{route=\"/b\",le=\"+Inf\"} 4\n\
                    h_bucket{route=\"/b\",le=\"1\"} 3\n\
                    h_bucket{route=\"/a\",le=\"0.1\"} 10\n\
                    h_bucket{route=\"/a\",le=\"1\"} 20\n\
                    h_bucket{route=\"/a\",le=\"+Inf\"} 20\n\
                    h_sum{route=\"/a\"} 5\n\
                    h_count{route=\"/a\"} 20\n";
        let e = Exposition::parse(text);
        assert_eq!(
            e.histogram_buckets("h"),
            vec![(0.1, 11.0), (1.0, 23.0), (f64::INFINITY, 24.0)]
        );
        assert!(e.histogram_buckets("nope").is_empty());
    }

    #[test]
    fn reads_every_line_of_the_services_real_output() {
        for (file, text) in [
            ("service-a", include_str!("testdata/service-a.prom")),
            ("service-b", include_str!("testdata/service-b.prom")),
            ("partner-api", include_str!("testdata/partner-api.prom")),
        ] {
            let e = Exposition::parse(text);
            let sample_lines = text
                .lines()
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .count();
            assert_eq!(e.malformed, 0, "{file}");
            assert_eq!(e.samples.len(), sample_lines, "{file}");
        }
    }
}
