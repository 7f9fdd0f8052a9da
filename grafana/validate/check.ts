// grafana/taproot.json checked against @grafana/schema (run: npm run check).
//
// dashboard.gen.ts (written by gen.mjs) holds the JSON as a literal that `satisfies` the
// schema's Dashboard (with the Prometheus query fields of types.ts): every field's type and
// every required field is checked, and an unknown key is an error. Here the same value is
// assigned to the plain schema type, so the file is a `Dashboard` as the schema defines it.
import type { Dashboard } from '@grafana/schema';
import { dashboard } from './dashboard.gen';

export const typed: Dashboard = dashboard;
