//! How the CLI prints payloads, queues and stats.

use std::io::Write;

use anyhow::Result;
use tidings_client::{QueueInfo, Stats};

/// UTF-8 payloads as they are; anything else as hex, so a line stays one line of
/// printable text.
pub fn display_payload(payload: &[u8]) -> String {
    match std::str::from_utf8(payload) {
        Ok(s) => s.to_owned(),
        Err(_) => payload.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

pub fn print_queue_table(out: &mut impl Write, queues: &[QueueInfo]) -> Result<()> {
    let width = queues
        .iter()
        .map(|q| q.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    writeln!(
        out,
        "{:<width$}  {:>8}  {:>9}  {:>7}  {:>9}  {:>4}  BINDINGS",
        "NAME", "DEPTH", "IN_FLIGHT", "DELAYED", "CONSUMERS", "DEAD"
    )?;
    for q in queues {
        let bindings: Vec<&str> = q.bindings.iter().map(|b| b.as_str()).collect();
        writeln!(
            out,
            "{:<width$}  {:>8}  {:>9}  {:>7}  {:>9}  {:>4}  {}",
            q.name.as_str(),
            q.depth,
            q.in_flight,
            q.delayed,
            q.consumers,
            q.dead_lettered,
            bindings.join(",")
        )?;
    }
    Ok(())
}

pub fn print_info(out: &mut impl Write, q: &QueueInfo) -> Result<()> {
    let bindings: Vec<&str> = q.bindings.iter().map(|b| b.as_str()).collect();
    writeln!(out, "name:           {}", q.name)?;
    writeln!(out, "bindings:       {}", bindings.join(", "))?;
    writeln!(out, "depth:          {}", q.depth)?;
    writeln!(out, "bytes:          {}", q.bytes)?;
    writeln!(out, "in_flight:      {}", q.in_flight)?;
    writeln!(out, "delayed:        {}", q.delayed)?;
    writeln!(out, "consumers:      {}", q.consumers)?;
    writeln!(out, "dead_lettered:  {}", q.dead_lettered)?;
    writeln!(out, "published:      {}", q.published)?;
    writeln!(out, "delivered:      {}", q.delivered)?;
    writeln!(out, "acked:          {}", q.acked)?;
    writeln!(out, "publish_rate:   {}/s", q.publish_rate)?;
    writeln!(out, "deliver_rate:   {}/s", q.deliver_rate)?;
    writeln!(out, "ack_rate:       {}/s", q.ack_rate)?;
    Ok(())
}

pub fn print_stats(stats: &Stats, json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let map: serde_json::Map<String, serde_json::Value> = stats
            .iter()
            .map(|(n, v)| (n.to_owned(), serde_json::Value::from(v)))
            .collect();
        writeln!(out, "{}", serde_json::Value::Object(map))?;
    } else {
        let width = stats.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
        for (name, value) in stats.iter() {
            writeln!(out, "{name:<width$}  {value:>12}")?;
        }
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_print_as_text_or_hex() {
        assert_eq!(display_payload(b"hello"), "hello");
        assert_eq!(display_payload(&[0xff, 0x00, 0x10]), "ff0010");
    }
}
