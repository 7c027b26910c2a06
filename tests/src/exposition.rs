//! A strict reader of the Prometheus text exposition format (and its OpenMetrics variant,
//! which the services serve), so tests can check that `/metrics` is well formed and look at
//! the names, types and labels it exposes.

use std::collections::BTreeMap;

/// One metric family: its `# TYPE` and the samples that belong to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: String,
    pub kind: String,
    pub help: Option<String>,
    pub unit: Option<String>,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

const KINDS: &[&str] =
    &["counter", "gauge", "histogram", "summary", "untyped", "unknown", "info", "stateset", "gaugehistogram"];
/// Sample-name suffixes a family of each kind may use.
const SUFFIXES: &[&str] = &["", "_total", "_created", "_bucket", "_count", "_sum", "_info", "_gcount", "_gsum"];

/// Parses `text`; the error names the offending line.
pub fn parse(text: &str) -> Result<Vec<Family>, String> {
    let mut families: Vec<Family> = Vec::new();
    let mut eof = false;
    for (n, line) in text.lines().enumerate() {
        let at = |msg: &str| format!("line {}: {msg}: {line:?}", n + 1);
        if eof {
            return Err(at("content after # EOF"));
        }
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut parts = comment.trim_start().splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("EOF"), None, None) => eof = true,
                (Some("TYPE"), Some(name), Some(kind)) => {
                    check_name(name).map_err(|e| at(&e))?;
                    if !KINDS.contains(&kind) {
                        return Err(at("unknown metric type"));
                    }
                    let family = family_entry(&mut families, name);
                    if !family.kind.is_empty() {
                        return Err(at("TYPE given twice"));
                    }
                    family.kind = kind.to_owned();
                }
                (Some(keyword @ ("HELP" | "UNIT")), Some(name), text) => {
                    check_name(name).map_err(|e| at(&e))?;
                    let family = family_entry(&mut families, name);
                    let text = Some(text.unwrap_or_default().to_owned());
                    if keyword == "HELP" {
                        family.help = text;
                    } else {
                        family.unit = text;
                    }
                }
                _ => {} // a free comment
            }
            continue;
        }
        let sample = parse_sample(line).map_err(|e| at(&e))?;
        let family = families
            .iter_mut()
            .rev()
            .find(|f| !f.kind.is_empty() && SUFFIXES.iter().any(|s| sample.name == format!("{}{s}", f.name)))
            .ok_or_else(|| at("sample of no family with a TYPE"))?;
        family.samples.push(sample);
    }
    if let Some(f) = families.iter().find(|f| f.kind.is_empty()) {
        return Err(format!("family `{}` has HELP/UNIT but no TYPE", f.name));
    }
    Ok(families)
}

/// The family `name`, created (without a TYPE yet) if HELP or UNIT comes first.
fn family_entry<'a>(families: &'a mut Vec<Family>, name: &str) -> &'a mut Family {
    match families.iter().position(|f| f.name == name) {
        Some(i) => &mut families[i],
        None => {
            families.push(Family {
                name: name.to_owned(),
                kind: String::new(),
                help: None,
                unit: None,
                samples: vec![],
            });
            families.last_mut().expect("just pushed")
        }
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        Ok(())
    } else {
        Err(format!("invalid metric name `{name}`"))
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    check_name(name)?;
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(body) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(body)?;
        labels = parsed;
        rest = after;
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("no value")?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse::<f64>().map_err(|_| format!("invalid value `{v}`"))?,
    };
    if let Some(ts) = fields.next() {
        ts.parse::<f64>().map_err(|_| format!("invalid timestamp `{ts}`"))?;
    }
    if fields.next().is_some() {
        return Err("trailing content".to_owned());
    }
    Ok(Sample { name: name.to_owned(), labels, value })
}

/// `k="v",k2="v2"}` → labels and the rest of the line.
fn parse_labels(mut s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    loop {
        if let Some(rest) = s.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let eq = s.find('=').ok_or("label without `=`")?;
        let key = &s[..eq];
        check_name(key).map_err(|_| format!("invalid label name `{key}`"))?;
        let mut chars = s[eq + 1..].char_indices();
        if chars.next().map(|(_, c)| c) != Some('"') {
            return Err("label value not quoted".to_owned());
        }
        let mut value = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next().map(|(_, c)| c) {
                    Some('n') => value.push('\n'),
                    Some(c @ ('\\' | '"')) => value.push(c),
                    _ => return Err("invalid escape in label value".to_owned()),
                },
                '"' => {
                    end = Some(eq + 1 + i + 1);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.ok_or("unterminated label value")?;
        if labels.insert(key.to_owned(), value).is_some() {
            return Err(format!("label `{key}` repeated"));
        }
        s = &s[end..];
        s = s.strip_prefix(',').unwrap_or(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_families_samples_and_labels() {
        let text = "# HELP http_requests Requests served.\n# TYPE http_requests counter\n\
                    http_requests_total{route=\"/orders\",status=\"201\"} 3\n\
                    # TYPE latency_seconds histogram\n# UNIT latency_seconds seconds\n\
                    latency_seconds_bucket{le=\"+Inf\"} 2\nlatency_seconds_sum 0.5\nlatency_seconds_count 2\n# EOF\n";
        let families = parse(text).expect("valid");
        assert_eq!(families.len(), 2);
        assert_eq!(families[0].kind, "counter");
        assert_eq!(families[0].help.as_deref(), Some("Requests served."));
        assert_eq!(families[0].samples[0].labels["status"], "201");
        assert_eq!(families[0].samples[0].value, 3.0);
        assert_eq!(families[1].unit.as_deref(), Some("seconds"));
        assert_eq!(families[1].samples.len(), 3);
        assert_eq!(families[1].samples[0].labels["le"], "+Inf");
        assert_eq!(families[1].samples[0].value, 2.0);
    }

    #[test]
    fn rejects_malformed_text() {
        for bad in [
            "orphan_total 1\n",
            "# TYPE x counter\nx_total{a=\"1\" 1\n",
            "# TYPE x counter\nx_total one\n",
            "# TYPE x wibble\n",
            "# TYPE 1x gauge\n",
            "# TYPE x gauge\nx{a=b} 1\n",
            "# TYPE x gauge\nx 1\n# EOF\nx 2\n",
            "# HELP x no type\nx 1\n",
            "# TYPE x gauge\n# TYPE x counter\n",
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
