//! B's in-process item cache (`service_b.item_cache_capacity`, 0 = off).
//!
//! Items are a seeded, read-only catalogue: nothing in the lab updates or
//! deletes a row of `items`, so an item once read never goes stale and the
//! cache needs no expiry, only a bound. It is off by default, so the lab's B
//! reads MySQL on every `GetItem` as the incident's did; on, it shows what
//! B's gRPC path costs without MySQL (`labctl bench grpc`).
//!
//! Concurrent misses for one id make one MySQL read: the first caller gets a
//! guard and the others wait for the value it inserts. A caller that finds
//! no item, or fails, drops the guard and the next waiter reads for itself:
//! a missing id or an error is never remembered.

use std::future::Future;

use lab_common::metrics::Registrar;
use lab_proto::v1::Item;
use prometheus::{IntCounter, Registry};

/// `lab_item_cache_lookups_total{outcome}`, its two series resolved once so
/// that counting a lookup is one atomic add.
#[derive(Clone)]
pub struct ItemCacheMetrics {
    hits: IntCounter,
    misses: IntCounter,
}

impl ItemCacheMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let lookups = Registrar(registry).int_counter_vec(
            "lab_item_cache_lookups_total",
            "GetItem lookups in B's item cache by outcome: hit, or miss (read from MySQL). \
             Nothing is counted while the cache is off.",
            &["outcome"],
        )?;
        Ok(Self {
            hits: lookups.with_label_values(&["hit"]),
            misses: lookups.with_label_values(&["miss"]),
        })
    }
}

/// Items by id, at most `service_b.item_cache_capacity` of them.
pub struct ItemCache {
    /// `None` when the capacity is 0: every lookup loads.
    items: Option<quick_cache::sync::Cache<i64, Item>>,
    metrics: ItemCacheMetrics,
}

impl ItemCache {
    pub fn new(capacity: u64, metrics: ItemCacheMetrics) -> Self {
        let items = (capacity > 0).then(|| {
            quick_cache::sync::Cache::new(usize::try_from(capacity).unwrap_or(usize::MAX))
        });
        Self { items, metrics }
    }

    /// Item `id` from memory, or from `load` (the MySQL read) on a miss or
    /// with the cache off; `Ok(None)` when there is no such item. `load` is
    /// only called, and so MySQL only touched, when the item is not cached.
    pub async fn get_or_load<E, F, Fut>(&self, id: i64, load: F) -> Result<Option<Item>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Item>, E>>,
    {
        let Some(items) = &self.items else {
            return load().await;
        };
        match items.get_value_or_guard_async(&id).await {
            Ok(item) => {
                self.metrics.hits.inc();
                Ok(Some(item))
            }
            Err(guard) => {
                self.metrics.misses.inc();
                let item = load().await?;
                if let Some(item) = &item {
                    // Fails only if the guard was overtaken, and then the
                    // value is in the cache already.
                    let _ = guard.insert(item.clone());
                }
                Ok(item)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn item(id: i64) -> Item {
        Item {
            id,
            name: format!("item-{id}"),
            price_cents: id * 10,
            description: "test".into(),
        }
    }

    fn cache(capacity: u64) -> (ItemCache, ItemCacheMetrics) {
        let metrics = ItemCacheMetrics::register(&Registry::new()).expect("metrics");
        (ItemCache::new(capacity, metrics.clone()), metrics)
    }

    /// A stand-in for the MySQL read that counts how often it runs.
    struct Loads(AtomicUsize);

    impl Loads {
        fn new() -> Self {
            Self(AtomicUsize::new(0))
        }

        async fn found(&self, id: i64) -> Result<Option<Item>, String> {
            self.0.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            Ok(Some(item(id)))
        }

        fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    #[tokio::test]
    async fn a_hit_does_not_load() {
        let (cache, metrics) = cache(100);
        let loads = Loads::new();
        let first = cache.get_or_load(7, || loads.found(7)).await;
        assert_eq!(first, Ok(Some(item(7))));
        assert_eq!(loads.count(), 1);
        let second = cache.get_or_load(7, || loads.found(7)).await;
        assert_eq!(second, Ok(Some(item(7))));
        assert_eq!(loads.count(), 1, "the hit read MySQL");
        assert_eq!((metrics.hits.get(), metrics.misses.get()), (1, 1));
    }

    #[tokio::test]
    async fn off_loads_every_time_and_counts_nothing() {
        let (cache, metrics) = cache(0);
        let loads = Loads::new();
        for _ in 0..3 {
            let got = cache.get_or_load(7, || loads.found(7)).await;
            assert_eq!(got, Ok(Some(item(7))));
        }
        assert_eq!(loads.count(), 3);
        assert_eq!((metrics.hits.get(), metrics.misses.get()), (0, 0));
    }

    #[tokio::test]
    async fn a_missing_item_or_an_error_is_not_remembered() {
        let (cache, metrics) = cache(100);
        let loads = AtomicUsize::new(0);
        let none = || async {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>(None)
        };
        assert_eq!(cache.get_or_load(9, none).await, Ok(None));
        assert_eq!(cache.get_or_load(9, none).await, Ok(None));
        let failing = || async {
            loads.fetch_add(1, Ordering::SeqCst);
            Err::<Option<Item>, _>("MySQL down".to_string())
        };
        assert_eq!(
            cache.get_or_load(9, failing).await,
            Err("MySQL down".into())
        );
        assert_eq!(loads.load(Ordering::SeqCst), 3);
        assert_eq!(metrics.misses.get(), 3);
        // Seeded later, it is found.
        let found = Loads::new();
        assert_eq!(
            cache.get_or_load(9, || found.found(9)).await,
            Ok(Some(item(9)))
        );
        assert_eq!(found.count(), 1);
    }

    #[tokio::test]
    async fn concurrent_misses_for_one_id_load_once() {
        let (cache, metrics) = cache(100);
        let loads = Loads::new();
        let (a, b, c) = tokio::join!(
            cache.get_or_load(3, || loads.found(3)),
            cache.get_or_load(3, || loads.found(3)),
            cache.get_or_load(3, || loads.found(3)),
        );
        assert_eq!(
            [a, b, c],
            [Ok(Some(item(3))), Ok(Some(item(3))), Ok(Some(item(3)))]
        );
        assert_eq!(loads.count(), 1);
        assert_eq!((metrics.hits.get(), metrics.misses.get()), (2, 1));
    }

    #[tokio::test]
    async fn the_cache_keeps_at_most_its_capacity() {
        let (cache, _) = cache(50);
        let loads = Loads::new();
        for id in 1..=1_000 {
            cache
                .get_or_load(id, || loads.found(id))
                .await
                .expect("loads");
        }
        let kept = cache.items.as_ref().map_or(0, |c| c.len());
        assert!(kept > 0 && kept <= 50, "{kept} items kept");
    }
}
