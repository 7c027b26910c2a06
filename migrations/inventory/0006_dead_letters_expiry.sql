-- DEAD_LETTER_RETENTION: the oldest dead letters are found and removed in bounded batches.
CREATE INDEX dead_letters_created_at ON dead_letters (created_at);
