-- Delivery reports (POST /webhooks/*) find their row by the provider's message id.
CREATE INDEX IF NOT EXISTS deliveries_provider_message
    ON __SCHEMA__.deliveries (provider, provider_message_id) WHERE provider_message_id IS NOT NULL;
