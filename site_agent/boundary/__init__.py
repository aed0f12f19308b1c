"""The site's trust boundary: the pipeline every task passes (parse, check from public
inputs, admit and charge, load, run, release), the one admission check, the ledger, the
budgets and what the site discloses."""
