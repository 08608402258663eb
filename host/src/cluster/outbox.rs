//! A link's outbound queue: frames waiting for the link's writer task.
//!
//! Bounded in frames and in bytes: a slow or stuck peer fills its own
//! queue and loses messages (the caller counts them), and never blocks
//! local delivery or the other links.
//!
//! Small frames are copied into one buffer as they are queued, so the
//! writer takes whole runs of them at once. Why: quinn sends each buffer it
//! is handed in STREAM frames of its own (a header, and acknowledgement
//! bookkeeping, per buffer), which for 64-byte events costs far more than
//! the copy (one stream carried 3-5x the frames a second once coalesced:
//! the cluster benchmark's last section). And an event then costs the
//! sender no allocation of its own: it is encoded once into a scratch
//! buffer and copied into each link's run (a `Bytes` per frame through a
//! channel, with the channel's blocks, was a sixth of a sending node's
//! allocator traffic). Large frames (sync messages, up to megabytes) are
//! queued as they are, never copied.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;

/// Frames a link's queue holds before new ones are dropped.
pub const QUEUE_FRAMES: usize = 16 * 1024;
/// Bytes a link's queue holds before new frames are dropped.
pub const QUEUE_BYTES: usize = 32 << 20;
/// Frames up to this size are copied together; larger ones stay apart.
pub const COALESCE_BELOW: usize = 16 * 1024;

#[derive(Default)]
pub struct Outbox {
    queue: Mutex<Queue>,
    /// Wakes the writer; a wake while it is busy is kept for its next wait.
    wake: Notify,
}

#[derive(Default)]
struct Queue {
    /// Queued in order before `run`: runs of small frames, large frames.
    chunks: VecDeque<Bytes>,
    /// The run of small frames being added to. Its allocation is reused
    /// once quinn has let go of what the writer took (a fresh buffer of a
    /// few hundred KiB per batch made glibc consolidate its free lists
    /// every time).
    run: BytesMut,
    frames: usize,
    /// Queued and taken but not yet written: the budget's measure.
    bytes: usize,
    /// Of `bytes`, those the writer has taken.
    taken: usize,
    /// The writer has stopped: nothing more is taken.
    closed: bool,
}

/// What the writer takes at once: the buffers in order, and how many
/// frames and bytes they hold. The bytes count against the queue's budget
/// until the writer reports them [`Outbox::written`].
pub struct Batch {
    pub chunks: Vec<Bytes>,
    pub frames: usize,
    pub bytes: usize,
}

impl Outbox {
    /// Queue a frame, copied (small) or as it is (large); false if the
    /// queue is full or closed. A frame larger than the whole byte budget
    /// is taken when the queue is empty, so it can always go eventually.
    pub fn push(&self, frame: &[u8]) -> bool {
        self.add(frame.len(), |q| {
            if frame.len() >= COALESCE_BELOW {
                q.end_run();
                q.chunks.push_back(Bytes::copy_from_slice(frame));
            } else {
                q.run.extend_from_slice(frame);
            }
        })
    }

    /// [`Outbox::push`] of a frame the caller already holds as `Bytes`:
    /// a large one is queued without a copy.
    pub fn push_bytes(&self, frame: Bytes) -> bool {
        if frame.len() < COALESCE_BELOW {
            return self.push(&frame);
        }
        self.add(frame.len(), |q| {
            q.end_run();
            q.chunks.push_back(frame);
        })
    }

    fn add(&self, len: usize, put: impl FnOnce(&mut Queue)) -> bool {
        let mut q = self.queue.lock().unwrap();
        let full = q.frames >= QUEUE_FRAMES || (q.bytes + len > QUEUE_BYTES && q.bytes > 0);
        if q.closed || full {
            return false;
        }
        let was_empty = q.frames == 0;
        put(&mut q);
        q.frames += 1;
        q.bytes += len;
        drop(q);
        // A writer with frames queued is awake already, or about to take
        // them: only the first frame after it emptied the queue wakes it.
        if was_empty {
            self.wake.notify_one();
        }
        true
    }

    /// Everything queued, oldest first, waiting while there is nothing;
    /// `None` once closed.
    pub async fn take(&self) -> Option<Batch> {
        loop {
            {
                let mut q = self.queue.lock().unwrap();
                if q.closed {
                    return None;
                }
                if q.frames > 0 {
                    q.end_run();
                    let batch = Batch {
                        chunks: q.chunks.drain(..).collect(),
                        frames: q.frames,
                        bytes: q.bytes - q.taken,
                    };
                    q.frames = 0;
                    q.taken = q.bytes;
                    return Some(batch);
                }
            }
            self.wake.notified().await;
        }
    }

    /// The writer has sent a batch's bytes: room for as many again.
    pub fn written(&self, bytes: usize) {
        let mut q = self.queue.lock().unwrap();
        q.bytes -= bytes;
        q.taken -= bytes;
    }

    /// Stop taking frames (the writer is gone); what is queued is dropped.
    pub fn close(&self) {
        let mut q = self.queue.lock().unwrap();
        q.closed = true;
        q.chunks.clear();
        q.run = BytesMut::new();
        drop(q);
        self.wake.notify_one();
    }
}

impl Queue {
    /// Move the run of small frames (if any) onto the chunks.
    fn end_run(&mut self) {
        if !self.run.is_empty() {
            let run = self.run.split().freeze();
            self.chunks.push_back(run);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;

    /// `take` when frames are queued: ready at once, never waiting.
    fn now(outbox: &Outbox) -> Option<Batch> {
        let fut = std::pin::pin!(outbox.take());
        let waker = std::task::Waker::noop();
        match fut.poll(&mut std::task::Context::from_waker(waker)) {
            std::task::Poll::Ready(b) => b,
            std::task::Poll::Pending => panic!("take waited with frames queued"),
        }
    }

    #[test]
    fn small_frames_are_copied_together_in_order_and_large_ones_stay_apart() {
        let o = Outbox::default();
        let big = Bytes::from(vec![9u8; COALESCE_BELOW]);
        assert!(o.push(b"ab"));
        assert!(o.push(b"cd"));
        assert!(o.push_bytes(big.clone()));
        assert!(o.push(b"e"));
        let b = now(&o).unwrap();
        assert_eq!(b.frames, 4);
        assert_eq!(b.chunks.concat(), [&b"abcd"[..], &big, b"e"].concat());
        let lens: Vec<usize> = b.chunks.iter().map(Bytes::len).collect();
        assert_eq!(lens, [4, COALESCE_BELOW, 1]);
        // The large frame was queued as it was, not copied.
        assert_eq!(b.chunks[1].as_ptr(), big.as_ptr());
        // Taken means gone: the next batch holds only what came after.
        assert!(o.push(b"f"));
        let b = now(&o).unwrap();
        assert_eq!((b.frames, b.chunks.concat()), (1, b"f".to_vec()));
    }

    #[test]
    fn a_full_queue_refuses_frames_until_the_writer_takes_them() {
        let o = Outbox::default();
        for _ in 0..QUEUE_FRAMES {
            assert!(o.push(b"x"));
        }
        assert!(!o.push(b"x"), "past the frame budget");
        let b = now(&o).unwrap();
        assert_eq!((b.frames, b.bytes), (QUEUE_FRAMES, QUEUE_FRAMES));
        // Taken frames no longer count; their bytes do, until written.
        assert!(o.push(b"x"));
        o.written(b.bytes);
        o.written(now(&o).unwrap().bytes);
        // Bytes: one frame over the whole budget goes into an empty queue,
        // and nothing after it until it is taken.
        let huge = vec![0u8; QUEUE_BYTES + 1];
        assert!(o.push(&huge));
        assert!(!o.push(b"x"), "past the byte budget");
        let b = now(&o).unwrap();
        assert_eq!(b.chunks[0].len(), QUEUE_BYTES + 1);
        // Taken is not yet sent: the bytes count until written.
        assert!(!o.push(b"x"), "the writer still holds the budget's bytes");
        o.written(b.bytes);
        assert!(o.push(b"xy"));
        assert!(o.push(b"z"));
        let b = now(&o).unwrap();
        assert_eq!((b.frames, b.bytes), (2, 3));
        // Closed: nothing taken, nothing queued.
        o.close();
        assert!(!o.push(b"x"));
        assert!(now(&o).is_none());
    }

    #[tokio::test]
    async fn a_waiting_writer_wakes_for_the_first_frame() {
        let o = std::sync::Arc::new(Outbox::default());
        let writer = tokio::spawn({
            let o = o.clone();
            async move { o.take().await.map(|b| b.chunks.concat()) }
        });
        tokio::task::yield_now().await;
        assert!(o.push(b"hello"));
        assert_eq!(writer.await.unwrap(), Some(b"hello".to_vec()));
    }
}
