//! A script's mailbox: a bounded queue of deliveries, filled by the
//! router from any thread and drained by one receiver.
//!
//! A tokio channel moved each delivery alone: a permit taken and given
//! back, a slot claimed and marked ready, the receiver's waker checked —
//! atomics shared by the two threads on every event, a third of a node's
//! CPU when a peer's events arrived at full rate. Here a whole run of
//! deliveries (the events of one read off a link) goes in under one lock
//! with at most one wake-up, and the receiver takes a run out under one
//! lock. The bound counts deliveries, as before: what does not fit is
//! handed back to the router, which counts it dropped.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::Delivery;

/// A bounded mailbox: `(sender, receiver)`. The receiver sees the end
/// once every sender is gone and the queue is empty.
pub fn mailbox(capacity: usize) -> (MailboxTx, MailboxRx) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            items: VecDeque::new(),
            closed: false,
            receiver_gone: false,
        }),
        capacity: capacity.max(1),
        senders: AtomicUsize::new(1),
        ready: Notify::new(),
        room: Notify::new(),
    });
    (
        MailboxTx {
            shared: shared.clone(),
        },
        MailboxRx { shared },
    )
}

struct Shared {
    queue: Mutex<Queue>,
    capacity: usize,
    senders: AtomicUsize,
    /// Notified when the queue goes from empty to not, or closes: the
    /// receiver only waits after it found the queue empty.
    ready: Notify,
    /// Notified (all waiters) when a full queue gets room, or the
    /// receiver is gone: what a timer waiting to queue its tick waits on.
    room: Notify,
}

struct Queue {
    items: VecDeque<Delivery>,
    /// Every sender is gone.
    closed: bool,
    receiver_gone: bool,
}

pub struct MailboxTx {
    shared: Arc<Shared>,
}

impl Clone for MailboxTx {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        MailboxTx {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for MailboxTx {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.queue.lock().unwrap().closed = true;
            self.shared.ready.notify_one();
        }
    }
}

impl MailboxTx {
    /// Queue `d`; false (and `d` dropped) when the mailbox is full or its
    /// receiver is gone (the script stopped and is not yet unregistered).
    pub fn try_send(&self, d: Delivery) -> bool {
        let q = self.shared.queue.lock().unwrap();
        if self.room(&q) == 0 {
            return false;
        }
        self.push(q, d);
        true
    }

    /// How many more deliveries `q` takes without waiting: none once the
    /// receiver is gone.
    fn room(&self, q: &Queue) -> usize {
        if q.receiver_gone {
            return 0;
        }
        self.shared.capacity.saturating_sub(q.items.len())
    }

    /// Queue `d` (there is room), waking the receiver if it may wait.
    fn push(&self, mut q: MutexGuard<'_, Queue>, d: Delivery) {
        let was_empty = q.items.is_empty();
        q.items.push_back(d);
        drop(q);
        if was_empty {
            self.shared.ready.notify_one();
        }
    }

    /// Queue `d`, waiting for room; false if the receiver is gone.
    pub async fn send(&self, d: Delivery) -> bool {
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            // Registered before the check, so room made after it wakes us.
            room.as_mut().enable();
            {
                let q = self.shared.queue.lock().unwrap();
                if q.receiver_gone {
                    return false;
                }
                if self.room(&q) > 0 {
                    self.push(q, d);
                    return true;
                }
            }
            room.await;
        }
    }

    /// Queue as many of `ds` as fit, in order; how many did (none once the
    /// receiver is gone).
    pub fn send_many(&self, ds: &mut Vec<Delivery>) -> usize {
        let mut q = self.shared.queue.lock().unwrap();
        let n = self.room(&q).min(ds.len());
        let was_empty = q.items.is_empty();
        q.items.extend(ds.drain(..n));
        drop(q);
        if was_empty && n > 0 {
            self.shared.ready.notify_one();
        }
        n
    }
}

pub struct MailboxRx {
    shared: Arc<Shared>,
}

impl MailboxRx {
    /// The next delivery, waiting for one; none once every sender is gone
    /// and the queue is empty.
    pub async fn recv(&mut self) -> Option<Delivery> {
        loop {
            {
                let mut q = self.shared.queue.lock().unwrap();
                if let Some(d) = self.pop(&mut q) {
                    return Some(d);
                }
                if q.closed {
                    return None;
                }
            }
            self.shared.ready.notified().await;
        }
    }

    /// The next delivery if one is queued.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        self.pop(&mut self.shared.queue.lock().unwrap())
    }

    fn pop(&self, q: &mut Queue) -> Option<Delivery> {
        let full = q.items.len() >= self.shared.capacity;
        let d = q.items.pop_front();
        if full {
            self.shared.room.notify_waiters();
        }
        d
    }

    /// Up to `max` queued deliveries, handed to `take` in order under one
    /// lock, as long as `wanted` accepts them; the first it refuses stays
    /// queued. How many were taken.
    pub fn take_while(
        &mut self,
        max: usize,
        mut wanted: impl FnMut(&Delivery) -> bool,
        mut take: impl FnMut(Delivery),
    ) -> usize {
        let mut q = self.shared.queue.lock().unwrap();
        let mut n = 0;
        while n < max {
            match q.items.front() {
                Some(d) if wanted(d) => take(self.pop(&mut q).expect("a front")),
                _ => break,
            }
            n += 1;
        }
        n
    }
}

impl Drop for MailboxRx {
    /// What was queued is dropped now, not when the router unregisters the
    /// script: a caller waiting on a queued call's reply hears at once.
    fn drop(&mut self) {
        let unread = {
            let mut q = self.shared.queue.lock().unwrap();
            q.receiver_gone = true;
            std::mem::take(&mut q.items)
        };
        drop(unread);
        self.shared.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn timer(id: u64) -> Delivery {
        Delivery::Timer { generation: 1, id }
    }

    fn id_of(d: &Delivery) -> u64 {
        match d {
            Delivery::Timer { id, .. } => *id,
            _ => unreachable!(),
        }
    }

    #[tokio::test]
    async fn deliveries_come_out_in_order_up_to_the_bound() {
        let (tx, mut rx) = mailbox(3);
        assert!(tx.try_send(timer(1)));
        let mut more = vec![timer(2), timer(3), timer(4)];
        assert_eq!(tx.send_many(&mut more), 2, "room for two");
        assert_eq!(more.iter().map(id_of).collect::<Vec<_>>(), [4]);
        assert!(!tx.try_send(timer(5)), "full");
        assert_eq!(rx.recv().await.map(|d| id_of(&d)), Some(1));
        let mut out = Vec::new();
        assert_eq!(rx.take_while(10, |_| true, |d| out.push(id_of(&d))), 2);
        assert_eq!(out, [2, 3]);
        assert!(rx.try_recv().is_none());
        assert!(tx.try_send(timer(6)));
        assert_eq!(rx.try_recv().map(|d| id_of(&d)), Some(6));
    }

    #[tokio::test]
    async fn take_while_stops_at_the_first_refused_and_at_max() {
        let (tx, mut rx) = mailbox(10);
        let mut ds: Vec<_> = (1..=6).map(timer).collect();
        tx.send_many(&mut ds);
        let mut out = Vec::new();
        rx.take_while(2, |_| true, |d| out.push(id_of(&d)));
        rx.take_while(10, |d| id_of(d) != 4, |d| out.push(id_of(&d)));
        assert_eq!(out, [1, 2, 3]);
        assert_eq!(rx.try_recv().map(|d| id_of(&d)), Some(4));
    }

    #[tokio::test]
    async fn once_the_receiver_is_gone_nothing_queues_and_queued_calls_hear() {
        let (tx, rx) = mailbox(4);
        let (reply, mut answer) = tokio::sync::oneshot::channel();
        let msg = crate::router::Message {
            id: 1,
            from: "a".into(),
            to: "b".into(),
            name: "call".into(),
            payload: Default::default(),
            timestamp_ms: 0,
        };
        let call = Delivery::Command {
            msg,
            generation: 1,
            reply: Some(reply),
        };
        assert!(tx.try_send(call));
        drop(rx);
        assert_eq!(
            answer.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed),
            "the queued call's reply is dropped with the receiver"
        );
        assert!(!tx.try_send(timer(1)));
        assert_eq!(tx.send_many(&mut vec![timer(2)]), 0);
        assert!(!tx.send(timer(3)).await);
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_and_sees_the_end_after_the_last_sender() {
        let (tx, mut rx) = mailbox(4);
        let tx2 = tx.clone();
        let waiting = tokio::spawn(async move {
            let first = rx.recv().await.map(|d| id_of(&d));
            let second = rx.recv().await.map(|d| id_of(&d));
            (first, second, rx.recv().await.is_none())
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(tx.try_send(timer(1)));
        drop(tx);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(tx2.try_send(timer(2)));
        drop(tx2);
        assert_eq!(waiting.await.unwrap(), (Some(1), Some(2), true));
    }
}
