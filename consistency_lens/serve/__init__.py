"""`consistency-lens serve`: a lens viewer in the browser (a JSON API and one page, served offline)."""
