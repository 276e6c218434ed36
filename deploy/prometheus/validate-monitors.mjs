// Validates ServiceMonitor, PodMonitor and PrometheusRule objects (a JSON list on stdin) against
// the Prometheus Operator's schemas, as @kubernetes-models/prometheus-operator generates them
// from its CRDs. Prints one line per object; exits 1 when any is invalid.
//   node deploy/prometheus/validate-monitors.mjs MODELS_DIR < objects.json   (MODELS_DIR: `make monitoring-schemas`)
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const models = join(process.argv[2], 'node_modules/@kubernetes-models/prometheus-operator');
const v1 = await import(pathToFileURL(join(models, 'monitoring.coreos.com/v1/index.js')));
let invalid = 0;
for (const object of JSON.parse(readFileSync(0, 'utf8'))) {
  try {
    new v1[object.kind](object).validate();
    console.log(`valid ${object.kind} ${object.metadata.name}`);
  } catch (error) {
    invalid++;
    console.log(`invalid ${object.kind} ${object.metadata.name}: ${error.message}`);
  }
}
process.exit(invalid ? 1 : 0);
