-- pgvector. pgmq is installed by the tool before this file runs (extension, or the SQL the
-- official pgmq wheel ships when the server has no pgmq extension).
create extension if not exists vector;
