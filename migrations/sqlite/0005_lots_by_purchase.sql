-- A batch loads an account's spent lots only when it names them (a repeated
-- purchase, an extension, a refund), by purchase id.
CREATE INDEX lots_by_purchase ON lots (purchase_id);
