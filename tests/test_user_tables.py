"""User code's own rows in the journal's database: Journal.transaction(), and the demo's
`projects` table, which the core schema no longer makes (a journal that has one keeps it)."""
import pytest

from jobserver import JobServer, demo
from jobserver.errors import ServerClosed
from jobserver.journal import open_journal

# the table as jobserver 0.1's first migration made it in every journal
OLD_PROJECTS = {
    "sqlite": "CREATE TABLE IF NOT EXISTS projects (id INTEGER PRIMARY KEY AUTOINCREMENT, "
              "projname VARCHAR(190) NOT NULL, prodesc TEXT NULL, job_id VARCHAR(36) NULL, "
              "created_at BIGINT NOT NULL)",
    "mysql": "CREATE TABLE IF NOT EXISTS projects (id BIGINT AUTO_INCREMENT PRIMARY KEY, "
             "projname VARCHAR(190) NOT NULL, prodesc MEDIUMTEXT NULL, job_id VARCHAR(36) NULL, "
             "created_at BIGINT NOT NULL) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
}
TABLES = {
    "sqlite": "SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?",
    "mysql": "SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE() "
             "AND table_name = ?",
}


def _has_table(journal, name):
    with journal.transaction() as tx:
        tx.cursor.execute(tx.sql(TABLES[tx.dialect]), (name,))
        return tx.cursor.fetchone() is not None


def _run(server, task, params):
    job = server.wait(server.submit(task, params), 20)
    assert job["state"] == "succeeded", job
    return job


def test_a_new_journal_has_no_demo_table_until_the_demo_makes_its_own(db_url):
    journal = open_journal(db_url)
    try:
        assert _has_table(journal, "jobs") and not _has_table(journal, "projects")
    finally:
        journal.close()
    with JobServer(db_url, tasks=["jobserver.demo"], workers=1, poll_interval=0.05) as server:
        job = _run(server, "demo.create_project", {"projname": "first"})
        assert _has_table(server.journal, "projects")
        assert demo.projects_for(server.journal, job["id"]) == [
            {"projname": "first", "prodesc": None, "job_id": job["id"]}]


def test_a_journal_that_has_the_old_projects_table_keeps_it_and_its_rows(db_url):
    journal = open_journal(db_url)
    try:
        with journal.transaction() as tx:
            tx.cursor.execute(OLD_PROJECTS[tx.dialect])
            tx.cursor.execute(tx.sql("INSERT INTO projects (projname, prodesc, job_id, created_at) "
                                     "VALUES (?, ?, ?, ?)"), ("kept", "from before", "old-job", 1))
    finally:
        journal.close()
    with JobServer(db_url, tasks=["jobserver.demo"], workers=1, poll_interval=0.05) as server:
        assert demo.projects_for(server.journal, "old-job") == [
            {"projname": "kept", "prodesc": "from before", "job_id": "old-job"}]
        job = _run(server, "demo.create_project", {"projname": "new", "prodesc": "d"})
        assert demo.projects_for(server.journal, job["id"]) == [
            {"projname": "new", "prodesc": "d", "job_id": job["id"]}]
        assert len(demo.projects_for(server.journal, "old-job")) == 1


def test_a_user_transaction_commits_or_rolls_back_and_passes_the_drivers_errors(db_url):
    journal = open_journal(db_url)
    try:
        with journal.transaction() as tx:
            assert tx.paramstyle in ("qmark", "pyformat") and tx.dialect in ("sqlite", "mysql")
            tx.cursor.execute("CREATE TABLE IF NOT EXISTS notes (k VARCHAR(20) NOT NULL PRIMARY KEY)")
        insert = "INSERT INTO notes (k) VALUES (?)"
        with journal.transaction() as tx:
            tx.cursor.execute(tx.sql(insert), ("kept",))
        with pytest.raises(RuntimeError), journal.transaction() as tx:
            tx.cursor.execute(tx.sql(insert), ("rolled back",))
            raise RuntimeError("the block failed")
        with pytest.raises(Exception) as info, journal.transaction() as tx:
            tx.cursor.execute(tx.sql(insert), ("kept",))  # a duplicate key: the driver's own error
        assert "IntegrityError" in type(info.value).__name__
        with journal.transaction() as tx:
            tx.cursor.execute("SELECT k FROM notes ORDER BY k")
            assert [row[0] for row in tx.cursor.fetchall()] == ["kept"]
        assert journal.count_queued() == 0  # the journal's own connections are unharmed
    finally:
        journal.close()
    with pytest.raises(ServerClosed), journal.transaction():
        pass
