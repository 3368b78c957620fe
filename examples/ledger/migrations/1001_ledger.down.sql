DROP TABLE ledger_accounts;
