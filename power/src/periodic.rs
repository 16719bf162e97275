//! A background thread that runs until it is told to stop: the sampler's and the per-VM
//! meter's. Stopping wakes it at once, and dropping the handle stops it and waits for it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Instant;

/// Locks `m`, also after a panic poisoned it (the guarded data stays consistent).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The stop flag a background thread waits on.
#[derive(Debug, Default)]
pub struct StopSignal {
    stop: Mutex<bool>,
    wake: Condvar,
}

impl StopSignal {
    /// Sleeps until `deadline` or until stopped; true when stopped.
    pub fn wait_until(&self, deadline: Instant) -> bool {
        let mut stop = lock(&self.stop);
        loop {
            if *stop {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            stop = self
                .wake
                .wait_timeout(stop, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn stop(&self) {
        *lock(&self.stop) = true;
        self.wake.notify_all();
    }
}

/// A named thread running `body` with a [`StopSignal`]; stopped and joined on drop.
#[derive(Debug)]
pub struct BackgroundThread {
    signal: Arc<StopSignal>,
    thread: Option<JoinHandle<()>>,
}

impl BackgroundThread {
    /// Starts `body` on a thread named `name`; the body returns when its signal says stop.
    pub fn spawn(
        name: &str,
        body: impl FnOnce(&StopSignal) + Send + 'static,
    ) -> std::io::Result<Self> {
        let signal = Arc::new(StopSignal::default());
        let s = Arc::clone(&signal);
        let thread = thread::Builder::new()
            .name(name.into())
            .spawn(move || body(&s))?;
        Ok(BackgroundThread {
            signal,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.signal.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for BackgroundThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    #[test]
    fn runs_until_stopped_and_stopping_wakes_it() {
        let ticks = Arc::new(AtomicU32::new(0));
        let t = Arc::clone(&ticks);
        let bg = BackgroundThread::spawn("test-periodic", move |stop| {
            while !stop.wait_until(Instant::now() + Duration::from_millis(5)) {
                t.fetch_add(1, Ordering::Relaxed);
            }
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(60));
        let started = Instant::now();
        bg.stop();
        assert!(started.elapsed() < Duration::from_secs(1), "stop wakes it");
        let n = ticks.load(Ordering::Relaxed);
        assert!(n >= 2, "ran {n} times");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(ticks.load(Ordering::Relaxed), n, "no tick after stop");
        // A long wait ends at once when stopped.
        let bg = BackgroundThread::spawn("test-long", |stop| {
            stop.wait_until(Instant::now() + Duration::from_secs(3600));
        })
        .unwrap();
        let started = Instant::now();
        drop(bg);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
