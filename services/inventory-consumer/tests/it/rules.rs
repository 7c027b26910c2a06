//! The contract's inventory rules, end to end through the stream.

use domain::OrderId;

use crate::common::{cancelled, confirmed, created, Harness};

#[tokio::test]
async fn reserve_reject_confirm_and_cancel() {
    let h = Harness::new("rules").await;
    h.set_stock("SKU-A", 10).await;
    h.set_stock("SKU-B", 5).await;
    let running = h.start("c1").await;

    // Reserve, summing lines of the same sku.
    let reserved = OrderId::new();
    h.xadd(&created(reserved, &[("SKU-A", 2), ("SKU-B", 1), ("SKU-A", 1)])).await;
    h.drained().await;
    assert_eq!((h.stock("SKU-A").await, h.stock("SKU-B").await), ((10, 3), (5, 1)));
    assert_eq!(h.reservation(reserved).await.as_deref(), Some("RESERVED"));

    // Unknown sku: the whole order is rejected, nothing changes.
    let unknown = OrderId::new();
    h.xadd(&created(unknown, &[("SKU-A", 1), ("SKU-NOPE", 1)])).await;
    // Not enough stock for one line (4 available, 5 wanted): nothing changes.
    let short = OrderId::new();
    h.xadd(&created(short, &[("SKU-A", 1), ("SKU-B", 5)])).await;
    h.drained().await;
    assert_eq!((h.stock("SKU-A").await, h.stock("SKU-B").await), ((10, 3), (5, 1)));
    assert_eq!(h.reservation(unknown).await.as_deref(), Some("REJECTED"));
    assert_eq!(h.reservation(short).await.as_deref(), Some("REJECTED"));
    let reason: String = sqlx::query_scalar("SELECT reason FROM order_reservations WHERE order_id = $1")
        .bind(short.to_string())
        .fetch_one(h.pool())
        .await
        .unwrap();
    assert!(reason.contains("SKU-B"), "{reason}");

    // Cancel of a rejected order changes nothing.
    h.xadd(&cancelled(short, 2)).await;
    // Confirm moves the reservation out of stock.
    h.xadd(&confirmed(reserved, 2)).await;
    h.drained().await;
    assert_eq!((h.stock("SKU-A").await, h.stock("SKU-B").await), ((7, 0), (4, 0)));

    // Cancel after confirm restocks.
    h.xadd(&cancelled(reserved, 3)).await;
    // Cancel before confirm releases the reservation.
    let released = OrderId::new();
    h.xadd(&created(released, &[("SKU-B", 4)])).await;
    h.drained().await;
    assert_eq!(h.stock("SKU-B").await, (5, 4));
    h.xadd(&cancelled(released, 2)).await;
    h.drained().await;
    assert_eq!((h.stock("SKU-A").await, h.stock("SKU-B").await), ((10, 0), (5, 0)));
    assert_eq!(h.reservation(reserved).await.as_deref(), Some("CANCELLED"));
    assert_eq!(h.reservation(released).await.as_deref(), Some("CANCELLED"));
    running.stop().await;
}
