//! Counting a large body's points beside the proxy's thread, while the body arrives.
//!
//! A body's points are counted as it arrives ([`PointsCount`]). On the proxy's own thread the
//! reading and the counting add up: a 10 MB body spends ~4 ms arriving and ~5 ms being
//! counted, one after the other, and the thread serves no other connection while it counts.
//! From [`AWAY_BYTES`] on, the pieces go to a blocking thread instead, which joins them and
//! counts as they come: the count then overlaps the reading, and what is left to do when the
//! last byte arrives is the count of the last piece. Smaller bodies stay on the proxy's thread,
//! where handing pieces over would cost more than it saves.

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::quota::points::{InvalidJson, Points, PointsCount};

/// The size (announced, or arrived) from which a body is joined and counted away from the
/// proxy's thread.
pub const AWAY_BYTES: usize = 1 << 20;

/// Pieces (up to 64 KiB each) on their way to the counting thread before reading waits for
/// it: a thread that falls behind slows the client down, rather than piling the body up twice.
const PIECES_IN_FLIGHT: usize = 32;

/// A body being joined and counted on a blocking thread.
pub struct CountingThread {
    pieces: mpsc::Sender<Bytes>,
    done: JoinHandle<(BytesMut, Result<Points, InvalidJson>)>,
}

impl CountingThread {
    /// Goes on with `joined`, the body so far, and `count`, its count so far.
    pub fn start(mut joined: BytesMut, mut count: PointsCount) -> CountingThread {
        let (pieces, mut arriving) = mpsc::channel::<Bytes>(PIECES_IN_FLIGHT);
        let done = tokio::task::spawn_blocking(move || {
            while let Some(piece) = arriving.blocking_recv() {
                joined.extend_from_slice(&piece);
                // What else has come is joined before counting, without waiting.
                while let Ok(piece) = arriving.try_recv() {
                    joined.extend_from_slice(&piece);
                }
                count.feed(&joined);
            }
            let points = count.finish(&joined);
            (joined, points)
        });
        CountingThread { pieces, done }
    }

    /// Hands the next piece over, waiting while the thread is `PIECES_IN_FLIGHT` behind.
    pub async fn push(&mut self, piece: Bytes) {
        // A send fails only when the thread has ended, which it does early only by panicking:
        // `finish` passes that on.
        let _ = self.pieces.send(piece).await;
    }

    /// The body is complete: the joined body and its points, once the thread has counted the
    /// rest.
    pub async fn finish(self) -> (Bytes, Result<Points, InvalidJson>) {
        drop(self.pieces);
        match self.done.await {
            Ok((joined, points)) => (joined.freeze(), points),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("points counting thread: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::points::{count_points, PointsRule};

    fn rule() -> PointsRule {
        PointsRule {
            array_pointers: vec!["/locations".into()],
            unique_key_pointer: Some("/key".into()),
        }
    }

    fn body(n: usize) -> Vec<u8> {
        let items: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"key":"k{}","latlon":[55.1,37.2]}}"#, i % (n / 2 + 1)))
            .collect();
        format!(r#"{{"locations":[{}],"tail":1}}"#, items.join(",")).into_bytes()
    }

    /// Handed over from any point, in pieces of any size, the thread's count is the count of
    /// the whole body, and its joined body is the body.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_and_joins_what_it_is_handed() {
        let whole = body(60_000);
        for (first, piece) in [(0, 65_536), (1, 1_000), (300_000, 7_777), (whole.len(), 1)] {
            let rule = rule();
            let mut count = PointsCount::new(&rule);
            count.feed(&whole[..first]);
            let mut thread = CountingThread::start(BytesMut::from(&whole[..first]), count);
            for chunk in whole[first..].chunks(piece) {
                thread.push(Bytes::copy_from_slice(chunk)).await;
            }
            let (joined, points) = thread.finish().await;
            assert_eq!(joined.as_ref(), whole.as_slice());
            assert_eq!(points, count_points(&whole, &rule));
            assert_eq!(points.as_ref().map(|p| p.points), Ok(60_000));
        }
    }

    /// An invalid body is found invalid, however it was handed over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finds_an_invalid_body_invalid() {
        let mut broken = body(40_000);
        let at = broken.len() / 3;
        broken[at] = b'}';
        let rule = rule();
        let mut thread = CountingThread::start(BytesMut::new(), PointsCount::new(&rule));
        for chunk in broken.chunks(65_536) {
            thread.push(Bytes::copy_from_slice(chunk)).await;
        }
        let (_, points) = thread.finish().await;
        assert!(points.is_err());
        assert_eq!(points, count_points(&broken, &rule));
    }
}
