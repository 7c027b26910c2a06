//! How the relays shared the work: each relay's published count over the run, from its own
//! /metrics.

use serde::Serialize;

use crate::client::Api;

/// The relay counter of events moved to the stream.
pub const PUBLISHED: &str = "outbox_published_total";

#[derive(Debug, Clone, Serialize)]
pub struct RelayShare {
    pub url: String,
    /// Events this relay published during the run (None: its /metrics could not be read).
    pub published: Option<f64>,
}

/// Sum of every sample of counter `name` in a Prometheus text page (all label sets).
pub fn counter_sum(page: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in page.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        // `name 12`, `name{labels} 12` or `name{labels} 12 1700000000` (with a timestamp).
        let rest = match rest.chars().next() {
            Some(' ') => rest,
            Some('{') => match rest.find('}') {
                Some(end) => &rest[end + 1..],
                None => continue,
            },
            _ => continue,
        };
        if let Some(value) = rest.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

/// Reads every relay's counter now.
pub async fn snapshot(api: &Api, urls: &[String]) -> Vec<Option<f64>> {
    let pages = futures::future::join_all(urls.iter().map(|u| api.fetch_text(u))).await;
    pages.into_iter().map(|p| p.ok().and_then(|page| counter_sum(&page, PUBLISHED))).collect()
}

pub fn shares(urls: &[String], before: &[Option<f64>], after: &[Option<f64>]) -> Vec<RelayShare> {
    urls.iter()
        .zip(before.iter().zip(after))
        .map(|(url, (b, a))| RelayShare { url: url.clone(), published: a.zip(*b).map(|(a, b)| a - b) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_label_set_of_the_counter_only() {
        let page = "# HELP outbox_published_total Events published.\n\
                    # TYPE outbox_published_total counter\n\
                    outbox_published_total{stream=\"a\"} 10\n\
                    outbox_published_total{stream=\"b\"} 5 1700000000\n\
                    outbox_published_total_created 1700000000\n\
                    outbox_published 99\n\
                    outbox_publish_failures_total 3\n";
        assert_eq!(counter_sum(page, PUBLISHED), Some(15.0));
        assert_eq!(counter_sum("outbox_published_total 7\n", PUBLISHED), Some(7.0));
        assert_eq!(counter_sum("something_else 1\n", PUBLISHED), None);
    }

    #[test]
    fn shares_are_the_difference_per_relay() {
        let urls = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
        let s = shares(&urls, &[Some(10.0), Some(0.0), None], &[Some(60.0), Some(40.0), Some(5.0)]);
        assert_eq!(s[0].published, Some(50.0));
        assert_eq!(s[1].published, Some(40.0));
        assert_eq!(s[2].published, None, "unknown start, no figure");
    }
}
