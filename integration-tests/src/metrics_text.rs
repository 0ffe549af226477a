//! Reading a Prometheus text exposition (`/metrics`) in tests.

/// Sum of every sample of `name` whose labels contain all of `labels` (`key="value"` pairs).
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((metric, rest)) => (metric, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")))
        {
            let value: f64 = value.parse().ok()?;
            total = Some(total.unwrap_or(0.0) + value);
        }
    }
    total
}
