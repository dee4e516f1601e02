-- The reader study's database (study.sqlite), created by study.create_study in one transaction.
-- images: the re-encoded files under random names and whether each is real (never served).
-- items: grids and pairs under random public ids, and item_images their images slot by slot.
-- readers: name, role, personal token and, for simulated readers, their known rates.
-- assignments: every item of every reader in the reader's own order, and when it was last served.
-- answers: one row per answered item (UNIQUE reader, item), the indices called real as JSON.
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE images(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, is_real INTEGER NOT NULL CHECK (is_real IN (0, 1)),
                    source TEXT NOT NULL, sha256 TEXT NOT NULL);
CREATE TABLE items(id INTEGER PRIMARY KEY, public_id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL CHECK (kind IN ('grid', 'pair')),
                   number INTEGER NOT NULL UNIQUE);
CREATE TABLE item_images(item INTEGER NOT NULL REFERENCES items(id), slot INTEGER NOT NULL,
                         image INTEGER NOT NULL UNIQUE REFERENCES images(id), PRIMARY KEY (item, slot));
CREATE TABLE readers(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, role TEXT NOT NULL CHECK (role IN ('consultant', 'registrar', 'other')),
                     token TEXT NOT NULL UNIQUE, created TEXT NOT NULL, simulation TEXT);
CREATE TABLE assignments(reader INTEGER NOT NULL REFERENCES readers(id), item INTEGER NOT NULL REFERENCES items(id),
                         position INTEGER NOT NULL, served_at REAL, PRIMARY KEY (reader, item), UNIQUE (reader, position));
CREATE TABLE answers(id INTEGER PRIMARY KEY, reader INTEGER NOT NULL, item INTEGER NOT NULL, called_real TEXT NOT NULL,
                     seconds REAL, client_seconds REAL, answered_at TEXT NOT NULL,
                     UNIQUE (reader, item), FOREIGN KEY (reader, item) REFERENCES assignments(reader, item));
