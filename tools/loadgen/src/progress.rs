//! A once-a-second progress line on stderr.

use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::schedule::Schedule;
use crate::stats::Live;

pub async fn tick(schedule: Arc<Schedule>, live: Arc<Live>, stop: CancellationToken) {
    let tty = std::io::stderr().is_terminal();
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.tick().await;
    let mut last_done = 0;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = interval.tick() => {}
        }
        let ok = live.ok.load(Ordering::Relaxed);
        let failed = live.failed.load(Ordering::Relaxed);
        let done = ok + failed;
        let line = format!(
            "[{:>6.1}s] orders started {:>8}  requests ok {:>8}  failed {:>6}  {:>7} req/s",
            schedule.start().elapsed().as_secs_f64(),
            schedule.taken(),
            ok,
            failed,
            done - last_done,
        );
        last_done = done;
        let mut err = std::io::stderr().lock();
        // Progress is best effort: a closed stderr must not stop the run.
        let _ = if tty { write!(err, "\r{line}") } else { writeln!(err, "{line}") };
    }
    if tty {
        let _ = writeln!(std::io::stderr());
    }
}
