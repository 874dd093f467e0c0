//! Locking a `std::sync::Mutex` whatever became of the thread that held it before.
//!
//! A poisoned mutex only means that another thread panicked while holding it. Every
//! mutex of this crate guards state that stays valid at each step of its critical
//! section (a map, a counter, an `Instant`), so going on with it beats turning one panic
//! into a failure of every later request. A mutex whose state could be left half-changed
//! must not use this.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, ignoring poisoning (see the module documentation).
pub(crate) fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_mutex_is_still_locked_and_read() {
        let mutex = std::sync::Arc::new(Mutex::new(1));
        let held = std::sync::Arc::clone(&mutex);
        let panicked = std::thread::spawn(move || {
            let mut guard = held.lock().expect("not poisoned yet");
            *guard = 2;
            panic!("poisons the mutex");
        })
        .join();
        assert!(panicked.is_err());
        assert!(mutex.is_poisoned());
        assert_eq!(*lock(&mutex), 2);
    }
}
