//! Reading a `/metrics` page back: the samples of the Prometheus text exposition
//! format (`name{label="value",…} value`), for tests and tools that compare two
//! scrapes.

use std::collections::BTreeMap;

/// One sample: a series name (with `_bucket`, `_sum` or `_count` for
/// histograms), its labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Parses a text exposition; comments and blank lines are skipped. The error
    /// names the line that is not a sample.
    pub fn parse(text: &str) -> Result<Self, String> {
        let samples = text
            .lines()
            .enumerate()
            .map(|(i, line)| (i, line.trim()))
            .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
            .map(|(i, line)| sample(line).map_err(|e| format!("line {}: {e}: {line:?}", i + 1)))
            .collect::<Result<_, _>>()?;
        Ok(Self { samples })
    }

    /// The samples named `name` whose labels include every pair of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
    }

    /// The sum of the samples [`matching`](Self::matching) `name` and `labels`
    /// (0 when there are none: a counter not yet incremented is absent).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// Whether any sample is named `name`.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }
}

/// One sample line: `name value`, `name{labels} value`, optionally a timestamp.
fn sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty() {
        return Err("no metric name".into());
    }
    let (labels, rest) = if line[name_end..].starts_with('{') {
        labels(&line[name_end + 1..])?
    } else {
        (BTreeMap::new(), &line[name_end..])
    };
    let value = rest.split_whitespace().next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().map_err(|_| format!("{v:?} is not a number"))?,
    };
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `key="value",…}` (after the opening brace): the labels and what follows the
/// closing brace.
fn labels(mut s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut out = BTreeMap::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(rest) = s.strip_prefix('}') {
            return Ok((out, rest));
        }
        let eq = s.find('=').ok_or("a label without `=`")?;
        let key = s[..eq].trim().to_owned();
        let mut chars = s[eq + 1..].char_indices();
        if chars.next().map(|(_, c)| c) != Some('"') {
            return Err(format!("label {key} has no quoted value"));
        }
        let mut value = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    end = Some(eq + 1 + i + 1);
                    break;
                }
                '\\' => match chars.next().map(|(_, c)| c) {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => break,
                },
                c => value.push(c),
            }
        }
        let end = end.ok_or_else(|| format!("label {key}'s value is not closed"))?;
        out.insert(key, value);
        s = &s[end..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP tessera_requests_total Generations finished.
# TYPE tessera_requests_total counter
tessera_requests_total{api="grpc",outcome="ok"} 3
tessera_requests_total{api="http",outcome="ok"} 2
tessera_requests_total{api="grpc",outcome="invalid_argument"} 1

tessera_requests_in_flight 0
tessera_ttft_bucket{le="0.5"} 4
tessera_ttft_bucket{le="+Inf"} 5
tessera_ttft_sum 1.25e0
odd{label="a \"quoted\", \\ value\nx"} -2 1700000000000
"#;

    #[test]
    fn samples_sum_over_the_labels_not_given() {
        let s = Scrape::parse(PAGE).unwrap();
        assert_eq!(s.samples.len(), 8);
        assert_eq!(s.sum("tessera_requests_total", &[("outcome", "ok")]), 5.0);
        assert_eq!(
            s.sum(
                "tessera_requests_total",
                &[("api", "grpc"), ("outcome", "ok")]
            ),
            3.0
        );
        assert_eq!(s.sum("tessera_requests_total", &[]), 6.0);
        assert_eq!(
            s.sum("tessera_requests_total", &[("outcome", "cancelled")]),
            0.0
        );
        assert_eq!(s.sum("tessera_ttft_bucket", &[("le", "+Inf")]), 5.0);
        assert_eq!(s.sum("tessera_ttft_sum", &[]), 1.25);
        assert!(s.has("tessera_requests_in_flight") && !s.has("tessera_requests"));
    }

    #[test]
    fn escaped_label_values_and_timestamps_are_read() {
        let s = Scrape::parse(PAGE).unwrap();
        let odd = s.matching("odd", &[]).next().unwrap();
        assert_eq!(odd.labels["label"], "a \"quoted\", \\ value\nx");
        assert_eq!(odd.value, -2.0);
    }

    #[test]
    fn a_line_that_is_not_a_sample_is_an_error_naming_it() {
        for bad in [
            "name",
            "name{a=\"1\"}",
            "name{a=1} 2",
            "name{a=\"1} 2",
            "name{a} 2",
            "name x",
        ] {
            let err = Scrape::parse(&format!("# ok\n{bad}\n")).unwrap_err();
            assert!(err.starts_with("line 2: "), "{bad}: {err}");
        }
    }
}
